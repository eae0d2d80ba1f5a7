import ArgumentParser
import Foundation
import Sidecar

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create a model directory to start from: handler.py, requirements.txt, sidecar.yaml, sample.jsonl.",
        discussion: """
            Makes the directory NAME (in --directory, else the current directory) with a small handler \
            that needs no packages, a commented sidecar.yaml and a sample input, so that the next \
            command already runs. Refuses (exit code 2) when NAME exists or is not a valid model name.

              sidecar init my-model
              sidecar predict my-model --input my-model/sample.jsonl
            """)

    @Argument(help: "The model's name, also the new directory's name: letters, digits, '-', '_', '.'.")
    var name: String

    @Option(name: .long, help: "Create the model directory in this directory (default: the current directory).")
    var directory: String?

    func run() throws {
        guard Self.isValidName(name) else {
            throw Self.refuse("'\(name)' is not a valid model name: use letters, digits, '-', '_' and '.' (it appears in URLs)")
        }
        let parent = URL(fileURLWithPath: directory ?? FileManager.default.currentDirectoryPath)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw Self.refuse("--directory \(directory ?? "."): no such directory")
        }
        let model = parent.appendingPathComponent(name, isDirectory: true)
        let shown = Self.displayPath(name: name, in: directory)
        if (try? FileManager.default.attributesOfItem(atPath: model.path)) != nil {
            throw Self.refuse("\(shown) already exists; pick another name, or remove it first")
        }
        do {
            try FileManager.default.createDirectory(at: model, withIntermediateDirectories: false)
        } catch {
            throw Self.refuse("cannot create \(shown): \(error.localizedDescription)")
        }
        let files = ModelTemplate.files(name: name)
        do {
            for file in files {
                try Data(file.contents.utf8).write(to: model.appendingPathComponent(file.name), options: .withoutOverwriting)
            }
        } catch {
            try? FileManager.default.removeItem(at: model)
            StandardStreams.err("error: cannot write the files of \(shown): \(error.localizedDescription)\n")
            throw ExitCode(1)
        }

        let width = files.map { shown.count + 1 + $0.name.count }.max() ?? 0
        var text = "Created \(shown)/:\n"
        for file in files {
            let path = "\(shown)/\(file.name)"
            text += "  \(path)\(String(repeating: " ", count: max(1, width - path.count + 2)))\(file.purpose)\n"
        }
        let quoted = Self.shellQuoted(shown)
        let sample = Self.shellQuoted("\(shown)/sample.jsonl")
        text += """

            Next, run the model over its sample, then serve it (HTTP on :8000, gRPC on :8001):
              sidecar predict \(quoted) --input \(sample)
              sidecar serve \(quoted)

            """
        StandardStreams.out(text)
    }

    /// The rule of `name:` in sidecar.yaml, minus the names that are not directories.
    static func isValidName(_ name: String) -> Bool { ModelConfiguration.isValidName(name) }

    /// The model directory as the user would type it.
    static func displayPath(name: String, in directory: String?) -> String {
        guard var directory, directory != "." else { return name }
        while directory.count > 1, directory.hasSuffix("/") { directory.removeLast() }
        return directory == "/" ? "/\(name)" : "\(directory)/\(name)"
    }

    static func shellQuoted(_ text: String) -> String {
        let plain = text.unicodeScalars.allSatisfy {
            ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) || "-_./:@%+=,".unicodeScalars.contains($0)
        }
        return plain ? text : "'" + text.replacingOccurrences(of: "'", with: #"'\''"#) + "'"
    }

    /// Prints `message` as one line and returns the exit code for a refusal.
    static func refuse(_ message: String) -> ExitCode {
        StandardStreams.err("error: \(message)\n")
        return ExitCode(2)
    }
}
