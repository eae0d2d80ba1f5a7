import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Sidecar
import SidecarFront
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `sidecar deploy`: push a model directory to running nodes' admin APIs, without a repository (or
/// beside one, with `--publish`). Packed once; each node is asked first whether it has the bundle, so
/// a node that has it is not sent the bytes again; every node loads it beside what serves and
/// switches once ready.
struct DeployCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deploy",
        abstract: "Push a model directory to every node and switch each to it once it is ready there.",
        discussion: """
            --nodes takes admin API URLs, or dns:NAME:PORT for every address NAME resolves to (a Kubernetes headless \
            Service). Nodes are deployed to at once; one line per node shows how far it got.

              sidecar deploy Examples/iris --nodes http://10.0.0.5:8002,http://10.0.0.6:8002
              sidecar deploy ./iris --nodes dns:sidecar-headless.models.svc:8002 --publish /srv/models
            Exit codes: 0 every node serves it; 1 some do; 3 none does (or none could be reached); 2 bad usage.
            """)

    @Argument(help: "The model directory.")
    var directory: String

    @Option(name: .long, help: "Admin API URLs, comma-separated, or dns:NAME:PORT.")
    var nodes: String

    @Option(name: .long, help: "The model's name (default: name in sidecar.yaml, else the directory's name).")
    var name: String?

    @Option(name: .long, help: "The version (default: the next version with --publish, else the bundle's first 12 hex digits).")
    var version: String?

    @Option(name: .long, help: "Worker processes per node (default: workers in sidecar.yaml).")
    var workers: Int?

    @Option(name: .long, help: "Also publish it to this repository directory, so nodes that join later serve it too.")
    var publish: String?

    @Option(name: .long, help: "File holding the admin bearer token (default: $SIDECAR_ADMIN_TOKEN).")
    var tokenFile: String?

    @Option(name: .long, help: "Seconds to wait for each node (default 600).")
    var timeout: Int = 600

    func run() async throws {
        let token = try adminToken(file: tokenFile)
        let targets = try Self.resolve(nodes)
        let bundle: ModelBundle
        let packed: (data: Data, sha256: String)
        do {
            bundle = try ModelBundle(directory: directory)
            packed = try await BundleArchive.pack(directory: URL(fileURLWithPath: directory))
        } catch {
            throw reportFailure(error)
        }
        let modelName = name ?? bundle.configuration.name
        var chosenVersion = version ?? String(packed.sha256.prefix(12))
        if let publish {
            do {
                var published: String?
                let (manifest, _) = try await RepositoryPublisher(root: URL(fileURLWithPath: publish)).publish(directory: URL(fileURLWithPath: directory)) { manifest, sha in
                    published = try manifest.publish(name: modelName, bundle: sha, version: version, workers: workers)
                }
                chosenVersion = published ?? chosenVersion
                StandardStreams.line("published \(modelName) version \(chosenVersion) to \(publish) (manifest revision \(manifest.revision))")
            } catch {
                throw reportFailure(error)
            }
        }
        let board = ProgressBoard(nodes: targets)
        let ticker = Task { while !Task.isCancelled { board.draw(); try? await Task.sleep(for: .milliseconds(200)) } }
        let deployment = Deployment(
            name: modelName, version: chosenVersion, workers: workers, data: packed.data, sha256: packed.sha256, token: token,
            timeout: .seconds(Int64(timeout)))
        await withTaskGroup(of: Void.self) { group in
            for (index, node) in targets.enumerated() {
                group.addTask { await deployment.run(on: node) { board.update(index, $0) } }
            }
        }
        ticker.cancel()
        board.finish()
        let served = board.states.filter(\.done).count
        StandardStreams.line("\(modelName) version \(chosenVersion) (bundle \(packed.sha256.prefix(12))…) serves on \(served) of \(targets.count) node(s)")
        if served == targets.count { return }
        throw served == 0 ? AdminExit.unreachable : AdminExit.failed
    }

    /// The admin API base URLs `spec` names.
    static func resolve(_ spec: String) throws -> [String] {
        if spec.hasPrefix("dns:") {
            let parts = spec.dropFirst(4).split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, let port = Int(parts[1]), (1...65535).contains(port) else {
                throw ValidationError("--nodes dns:NAME:PORT, e.g. dns:sidecar-headless.models.svc:8002; got '\(spec)'")
            }
            let addresses = lookup(String(parts[0]))
            guard !addresses.isEmpty else { throw ValidationError("'\(parts[0])' resolves to no address") }
            return addresses.map { $0.contains(":") ? "http://[\($0)]:\(port)" : "http://\($0):\(port)" }
        }
        let urls = spec.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        for url in urls {
            guard let parsed = URL(string: url), parsed.scheme == "http" || parsed.scheme == "https", parsed.host != nil else {
                throw ValidationError("--nodes must be admin API URLs such as http://10.0.0.5:8002, or dns:NAME:PORT; got '\(url)'")
            }
        }
        guard !urls.isEmpty else { throw ValidationError("--nodes names no node") }
        return urls.map { $0.hasSuffix("/") ? String($0.dropLast()) : $0 }
    }

    /// Every address `host` resolves to (getaddrinfo: /etc/hosts and DNS, as the system resolves).
    static func lookup(_ host: String) -> [String] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return [] }
        defer { freeaddrinfo(first) }
        var addresses: [String] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            if getnameinfo(info.pointee.ai_addr, info.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST) == 0 {
                let address = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if !addresses.contains(address) { addresses.append(address) }
            }
            cursor = info.pointee.ai_next
        }
        return addresses
    }
}

/// One deployment to one node: has it the bundle? send it if not; deploy; report each step.
struct Deployment: Sendable {
    let name: String
    let version: String
    let workers: Int?
    let data: Data
    let sha256: String
    let token: String?
    let timeout: Duration

    enum Step: Sendable {
        case checking, uploading, loading
        case ready(sent: Int?)
        case failed(String)
    }

    func run(on node: String, report: @Sendable (Step) -> Void) async {
        do {
            report(.checking)
            // Short deadlines until the node is known to answer: a dead node is reported in seconds,
            // not after --timeout (the HTTP client keeps retrying a refused connection until then).
            let (status, _) = try await call(.GET, node + "/admin/v1/bundles/\(sha256)", deadline: .seconds(10))
            var sent: Int?
            if status == 404 {
                report(.uploading)
                let (status, body) = try await call(.PUT, node + "/admin/v1/bundles/\(sha256)", body: data, type: "application/gzip", deadline: .seconds(600))
                guard status == 201 else { return report(.failed(Self.message(status, body))) }
                sent = data.count
            } else if status != 200 {
                return report(.failed(Self.message(status, nil)))
            }
            report(.loading)
            struct Request: Encodable { var name: String; var bundle: String; var version: String; var workers: Int? }
            let body = try JSONEncoder().encode(Request(name: name, bundle: sha256, version: version, workers: workers))
            let (deployed, answer) = try await call(.POST, node + "/admin/v1/deployments", body: body, type: "application/json", deadline: timeout)
            guard deployed == 200 else { return report(.failed(Self.message(deployed, answer))) }
            report(.ready(sent: sent))
        } catch {
            report(.failed("cannot reach \(node): \(error)"))
        }
    }

    private func call(_ method: HTTPMethod, _ url: String, body: Data? = nil, type: String? = nil, deadline: Duration) async throws -> (UInt, Data) {
        var request = HTTPClientRequest(url: url)
        request.method = method
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let body, let type {
            request.headers.add(name: "Content-Type", value: type)
            request.body = .bytes(ByteBuffer(data: body))
        }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(deadline.components.seconds))
        let data = Data(buffer: try await response.body.collect(upTo: 16 << 20))
        return (response.status.code, data)
    }

    static func message(_ status: UInt, _ body: Data?) -> String {
        let text = body.flatMap { (try? JSONDecoder().decode([String: String].self, from: $0))?["error"] ?? String(data: $0, encoding: .utf8) }
        switch status {
        case 401, 403: return "the admin token is missing or wrong (\(status))"
        default: return "\(status): \(text ?? "")"
        }
    }
}

/// One line per node: a bar for how far it got, and its state. Redrawn in place on a terminal;
/// otherwise printed once per node when it is done.
final class ProgressBoard: Sendable {
    struct NodeState: Sendable {
        var node: String
        var step: Deployment.Step?
        var printed = false
        var done: Bool { if case .ready = step { return true } else { return false } }
        var finished: Bool {
            switch step {
            case .ready, .failed: return true
            default: return false
            }
        }
    }

    private let state: Mutex<(nodes: [NodeState], drawn: Int)>
    private let terminal = isatty(STDOUT_FILENO) != 0

    init(nodes: [String]) {
        state = Mutex((nodes.map { NodeState(node: $0) }, 0))
    }

    var states: [NodeState] { state.withLock { $0.nodes } }

    func update(_ index: Int, _ step: Deployment.Step) {
        state.withLock { $0.nodes[index].step = step }
        if !terminal { printFinished() }
    }

    func draw() {
        guard terminal else { return }
        let text: String = state.withLock { board in
            var out = board.drawn > 0 ? "\u{1B}[\(board.drawn)A" : ""
            for node in board.nodes { out += "\u{1B}[2K" + Self.line(node) + "\n" }
            board.drawn = board.nodes.count
            return out
        }
        StandardStreams.out(text)
    }

    func finish() {
        if terminal { draw() } else { printFinished() }
    }

    private func printFinished() {
        let lines: [String] = state.withLock { board in
            board.nodes.indices.compactMap { index in
                guard board.nodes[index].finished, !board.nodes[index].printed else { return nil }
                board.nodes[index].printed = true
                return Self.line(board.nodes[index])
            }
        }
        for line in lines { StandardStreams.line(line) }
    }

    static func line(_ node: NodeState) -> String {
        let (filled, label): (Int, String) = switch node.step {
        case nil: (0, "waiting")
        case .checking: (5, "checking")
        case .uploading: (10, "uploading")
        case .loading: (15, "loading")
        case .ready(let sent): (20, "ready" + (sent.map { " (sent \($0) bytes)" } ?? " (had the bundle)"))
        case .failed(let reason): (0, "FAILED: \(reason)")
        }
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: 20 - filled)
        return "\(node.node.padding(toLength: max(28, node.node.count), withPad: " ", startingAt: 0))  [\(bar)]  \(label)"
    }
}
