import ArgumentParser
import Foundation
import Sidecar
import SidecarFront

/// The repository's writer side: nodes follow what these commands put in `manifest.json`.
struct RepositoryArguments: ParsableArguments {
    @Option(name: .long, help: "The model repository: a directory (shared volume, NFS, or what a web server serves).")
    var repository: String

    func publisher() throws -> RepositoryPublisher {
        if repository.hasPrefix("http://") || repository.hasPrefix("https://") {
            throw ValidationError("--repository must be a directory to publish to (nodes may read it over HTTP; publishing writes files), got '\(repository)'")
        }
        return RepositoryPublisher(root: URL(fileURLWithPath: repository))
    }
}

struct PublishCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "publish",
        abstract: "Publish a model directory to a model repository: every node serving it loads the new version, then switches to it.",
        discussion: """
            The directory is packed into a content-addressed bundle (bundles/<sha256>.tar.gz) and manifest.json is \
            updated; both are written to a temporary file, flushed and renamed, so a node never reads half of either. \
            Weights are relative: stable 90 and canary 10 send a tenth of the traffic to the canary. --weight 0 removes a label.

              sidecar publish Examples/iris --repository /srv/models
              sidecar publish ./iris-v2 --repository /srv/models --name iris --label canary --weight 10
              sidecar publish --repository /srv/models --name iris --label canary --weight 0
            Exit codes: 0 published; 1 refused; 2 bad usage or a bad model directory.
            """)

    @Argument(help: "The model directory (omit with --weight 0, or with --version to point a label at a version published before).")
    var directory: String?

    @OptionGroup var repository: RepositoryArguments

    @Option(name: .long, help: "The model's name (default: name in sidecar.yaml, else the directory's name).")
    var name: String?

    @Option(name: .long, help: "The version (default: one past the highest published).")
    var version: String?

    @Option(name: .long, help: "The label this version serves under (default stable).")
    var label: String = "stable"

    @Option(name: .long, help: "The label's share of traffic, relative to the model's other labels (default 100; 0 removes the label).")
    var weight: Int = 100

    @Option(name: .long, help: "Worker processes per node (default: workers in sidecar.yaml).")
    var workers: Int?

    func validate() throws {
        if let workers, !ModelConfiguration.workerRange.contains(workers) {
            throw ValidationError("--workers must be from \(ModelConfiguration.workerRange.lowerBound) to \(ModelConfiguration.workerRange.upperBound), got \(workers)")
        }
        if directory == nil, name == nil { throw ValidationError("give a model directory, or --name with --weight 0 or --version") }
        if directory == nil, weight != 0, version == nil { throw ValidationError("without a directory, give --version (a version published before) or --weight 0") }
    }

    func run() async throws {
        do {
            var modelName = name
            if let directory {
                let bundle = try ModelBundle(directory: directory)
                modelName = modelName ?? bundle.configuration.name
            }
            guard let modelName else { throw ValidationError("--name is needed") }
            var chosen: String?
            let (manifest, sha) = try await repository.publisher().publish(directory: directory.map { URL(fileURLWithPath: $0) }) { manifest, bundle in
                chosen = try manifest.publish(name: modelName, bundle: bundle, version: version, label: label, weight: weight, workers: workers)
            }
            if let chosen {
                let bundle = sha.map { " (bundle \($0.prefix(12))…)" } ?? ""
                StandardStreams.line("published \(modelName) version \(chosen) as \(label), weight \(weight)\(bundle); manifest revision \(manifest.revision)")
            } else {
                StandardStreams.line("removed label \(label) of \(modelName); manifest revision \(manifest.revision)")
            }
        } catch let error as ValidationError {
            throw error
        } catch {
            throw reportFailure(error)
        }
    }
}

struct RollbackCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback",
        abstract: "Point a model's label (default stable) back at the version published before it, or at --to VERSION.",
        discussion: """
            Nodes still have the old bundle and its environment cached, so they switch back within a poll interval \
            plus the time its workers take to start.

              sidecar rollback iris --repository /srv/models
              sidecar rollback iris --repository /srv/models --to 3
            """)

    @Argument(help: "The model's name.")
    var model: String

    @OptionGroup var repository: RepositoryArguments

    @Option(name: .long, help: "The label to move (default stable).")
    var label: String = "stable"

    @Option(name: .long, help: "The version to go back to (default: the one published before the current).")
    var to: String?

    func run() async throws {
        do {
            var chosen = ""
            let (manifest, _) = try await repository.publisher().publish(directory: nil) { manifest, _ in
                chosen = try manifest.rollback(name: model, label: label, to: to)
            }
            StandardStreams.line("\(model) \(label) is version \(chosen) again; manifest revision \(manifest.revision)")
        } catch {
            throw reportFailure(error)
        }
    }
}

struct SyncCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync",
        abstract: "Make a running server sync with its model repository now, and print what it serves.",
        discussion: "Exit codes: 0 synced and caught up; 1 something is not serving (the reasons are printed); 3 unreachable; 4 token.")

    @OptionGroup var admin: AdminArguments

    @Flag(name: .long, help: "Print the repository status as JSON.")
    var json = false

    func run() async throws {
        let data = try await admin.client().call(.POST, "/admin/v1/repository/sync")
        if json {
            StandardStreams.out(data)
            StandardStreams.line("")
        }
        let status = try JSONDecoder().decode(RepositoryStatus.self, from: data)
        if !json {
            StandardStreams.line("repository \(status.source), revision \(status.revision.map(String.init) ?? "none")")
            for name in status.models.keys.sorted() {
                guard let model = status.models[name] else { continue }
                let serving = model.serving.map { "\($0.version) (\($0.label ?? "-") \($0.weight))" }.joined(separator: ", ")
                StandardStreams.line("  \(name): serving \(serving.isEmpty ? "nothing" : serving)\(model.error.map { "; error: \($0)" } ?? "")")
            }
            if let error = status.lastError { StandardStreams.line("  error: \(error)") }
        }
        let healthy = status.lastError == nil && status.models.values.allSatisfy { $0.error == nil && !$0.serving.isEmpty }
        if !healthy { throw AdminExit.failed }
    }
}
