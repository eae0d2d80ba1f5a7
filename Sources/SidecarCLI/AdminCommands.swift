import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL
import Synchronization
import NIOHTTP1
import NIOFoundationCompat
import Sidecar
import SidecarFront

/// Exit codes of the commands that talk to a server, for scripts:
/// 0 done; 1 the server refused or the operation failed; 2 bad usage or local input;
/// 3 the server could not be reached; 4 the admin token is missing or wrong.
enum AdminExit {
    static let failed = ExitCode(1)
    static let usage = ExitCode(2)
    static let unreachable = ExitCode(3)
    static let unauthorized = ExitCode(4)
}

/// Where the server's admin API is and how to authenticate.
struct AdminArguments: ParsableArguments {
    @Option(name: .long, help: "The server's admin API (default: $SIDECAR_SERVER, else http://127.0.0.1:8002).")
    var server: String?

    @Option(name: .long, help: "File holding the admin bearer token (default: $SIDECAR_ADMIN_TOKEN).")
    var tokenFile: String?

    @Option(name: .long, help: "With an https --server: the CA certificate (PEM) that signed the server's (default: $SIDECAR_CA_FILE, else the system's roots).")
    var caFile: String?

    func client() throws -> AdminClient {
        let environment = ProcessInfo.processInfo.environment
        let base = server ?? environment["SIDECAR_SERVER"] ?? "http://127.0.0.1:8002"
        guard let url = URL(string: base), url.scheme == "http" || url.scheme == "https", url.host != nil else {
            throw ValidationError("--server must be an http(s) URL such as http://127.0.0.1:8002, got '\(base)'")
        }
        var http = HTTPClient.shared
        if let ca = caFile ?? environment["SIDECAR_CA_FILE"].flatMap({ $0.isEmpty ? nil : $0 }) {
            http = try AdminClient.trusting(ca: ca)
        }
        return AdminClient(base: base.hasSuffix("/") ? String(base.dropLast()) : base, token: try adminToken(file: tokenFile), http: http)
    }
}

/// The admin bearer token: from `file` (`--token-file`), else `$SIDECAR_ADMIN_TOKEN`, else none.
func adminToken(file: String?) throws -> String? {
    if let file {
        do { return try readAdminToken(file: file) } catch { throw reportFailure(error) }
    }
    return ProcessInfo.processInfo.environment["SIDECAR_ADMIN_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
}

/// A small client of the admin API (AsyncHTTPClient). Errors are printed the way a person can act
/// on them and turned into the exit codes above.
struct AdminClient {
    let base: String
    let token: String?
    var http: HTTPClient = .shared

    /// A client that trusts the CA in `ca` (a server with its own certificate authority). Made once
    /// and kept for the process's life, as `HTTPClient.shared` is.
    static func trusting(ca: String) throws -> HTTPClient {
        let roots: [NIOSSLCertificate]
        do { roots = try NIOSSLCertificate.fromPEMFile(ca) } catch {
            throw ValidationError("--ca-file \(ca): cannot read PEM certificates from it (\(error))")
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates(roots)
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tls))
        keptClients.withLock { $0.append(client) }
        return client
    }

    func call(
        _ method: HTTPMethod, _ path: String, json: (any Encodable)? = nil, body: Data? = nil,
        headers extra: [(String, String)] = [], timeout: TimeAmount = .minutes(30)
    ) async throws -> Data {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        for (name, value) in extra { request.headers.add(name: name, value: value) }
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(data: try JSONEncoder().encode(json)))
        } else if let body {
            request.headers.add(name: "Content-Type", value: "application/gzip")
            request.body = .bytes(ByteBuffer(data: body))
        }
        let response: HTTPClientResponse
        let data: Data
        do {
            response = try await http.execute(request, timeout: timeout)
            data = Data(buffer: try await response.body.collect(upTo: 64 << 20))
        } catch {
            StandardStreams.err("error: cannot reach the Sidecar admin API at \(base) (\(error)); is `sidecar serve` running, and is --server right?\n")
            throw AdminExit.unreachable
        }
        guard (200..<300).contains(Int(response.status.code)) else {
            let message = (try? JSONDecoder().decode([String: String].self, from: data))?["error"]
                ?? String(decoding: data, as: UTF8.self)
            StandardStreams.err("error: \(message)\n")
            switch response.status.code {
            case 401, 403: throw AdminExit.unauthorized
            case 400, 404, 409, 413: throw AdminExit.failed
            default: throw AdminExit.failed
            }
        }
        return data
    }
}

/// The admin API's model summary, as the CLI reads it.
struct ModelSummary: Decodable {
    struct Autoscaling: Decodable {
        var min: Int
        var max: Int
        var enabled: Bool
        var last_decision: String?
    }

    var name: String
    var state: String
    var reason: String?
    var workers_ready: Int
    var workers_target: Int
    var queued: Int
    var requests_per_second: Double
    var p99_ms: Double?
    var restarts: Int
    var autoscaling: Autoscaling?
    var executor: String?
    var executor_note: String?
    var admission: Admission?
    var breaker: Breaker?

    struct Breaker: Decodable {
        var state: String
        var retry_in_s: Double?
    }

    struct Admission: Decodable {
        var mode: String
        var limit: Int
        var refused: [String: Int]
    }
}

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show a running server's models: state, workers ready/target, queue/limit, refused, breaker, req/s, p99, restarts.",
        discussion: """
            Exit codes: 0 shown; 1 the server refused; 3 the server could not be reached; 4 the admin \
            token is missing or wrong.

              sidecar status
              sidecar status --json | jq '.models[] | select(.state != "ready")'
            """)

    @Flag(name: .long, help: "Print the server's JSON (every worker's pid, state, RSS, restarts) instead of a table.")
    var json = false

    @OptionGroup var admin: AdminArguments

    func run() async throws {
        let data = try await admin.client().call(.GET, "/admin/v1/models")
        if json {
            StandardStreams.out(data)
            StandardStreams.out("\n")
            return
        }
        struct List: Decodable { var models: [ModelSummary] }
        let models = try JSONDecoder().decode(List.self, from: data).models
        var rows = [["MODEL", "STATE", "EXECUTOR", "WORKERS", "QUEUE", "REFUSED", "BREAKER", "REQ/S", "P99 MS", "RESTARTS", "AUTOSCALE"]]
        for m in models {
            let autoscale = m.autoscaling.map { a in
                a.enabled ? "\(a.min)-\(a.max)" + (a.last_decision.map { " (\($0))" } ?? "") : "off (\(a.last_decision ?? "set by hand"))"
            } ?? "-"
            rows.append([
                // The queue against its limit (an adaptive limit marked ~), and refusals since the start.
                m.name, m.state, m.executor ?? "process", "\(m.workers_ready)/\(m.workers_target)",
                m.admission.map { "\(m.queued)/\($0.mode == "adaptive" ? "~" : "")\($0.limit)" } ?? "\(m.queued)",
                m.admission.map { "\($0.refused.values.reduce(0, +))" } ?? "-",
                m.breaker.map { b in b.state + (b.retry_in_s.map { String(format: " (%.0fs)", $0) } ?? "") } ?? "-",
                String(format: "%.1f", m.requests_per_second), m.p99_ms.map { String(format: "%.1f", $0) } ?? "-", "\(m.restarts)", autoscale,
            ])
        }
        let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        for row in rows {
            let line = row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
            StandardStreams.line(line)
        }
        for m in models where m.state == "failed" {
            StandardStreams.line("\n\(m.name) FAILED: \(m.reason ?? "no reason recorded")")
        }
        for m in models where m.executor_note != nil && m.executor != "embedded" {
            // An embedded model sent to process workers by a crash: the operator's cue to act.
            StandardStreams.line("\n\(m.name): \(m.executor_note ?? "")")
        }
    }
}

struct ScaleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "Set a model's worker count while it serves; answers once the change is done.",
        discussion: """
            New workers are ready, or leaving ones have finished their batches and exited, before this \
            returns; no request is dropped. On a model that autoscales, this turns autoscaling off until \
            the model is reloaded. Exit codes: 0 done; 1 refused or timed out; 3 unreachable; 4 token.

              sidecar scale iris 4
            """)

    @Argument(help: "The model's name.")
    var model: String

    @Argument(help: "Worker processes (1 to 256).")
    var workers: Int

    @Option(name: .long, help: "Seconds to wait for the change (default 120).")
    var timeout: Double = 120

    @Flag(name: .long, help: "Return at once; the change goes on in the server (watch it with `sidecar status`).")
    var noWait = false

    @OptionGroup var admin: AdminArguments

    func validate() throws {
        guard ModelConfiguration.workerRange.contains(workers) else { throw ValidationError("workers must be from 1 to 256, got \(workers)") }
        guard timeout > 0, timeout <= 365 * 86400 else { throw ValidationError("--timeout must be a positive number of seconds, at most a year") }
    }

    func run() async throws {
        struct Body: Encodable {
            var workers: Int
            var timeout_s: Double
            var wait: Bool
        }
        let data = try await admin.client().call(
            .PUT, "/admin/v1/models/\(model)/workers", json: Body(workers: workers, timeout_s: timeout, wait: !noWait),
            timeout: .seconds(Int64(timeout) + 30))
        let summary = try JSONDecoder().decode(ModelSummary.self, from: data)
        if noWait {
            StandardStreams.line("\(summary.name): scaling to \(workers) workers (now \(summary.workers_ready)/\(summary.workers_target) ready)")
        } else {
            StandardStreams.line("\(summary.name): \(summary.workers_ready)/\(summary.workers_target) workers ready")
        }
    }
}

struct LoadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Load a model directory into a running server (packs and uploads it).",
        discussion: """
            The directory is packed as a tar.gz and uploaded with its sha256; the server checks the bundle \
            before unpacking anything, builds the environment (pip), starts the workers and answers once \
            they are ready. With --on-server, DIR is a path on the server's machine and nothing is uploaded.
            Exit codes: 0 loaded; 1 refused (bad bundle, name taken, handler failed to load); 2 bad \
            directory; 3 unreachable; 4 token.

              sidecar load Examples/iris --name iris-v2
            """)

    @Argument(help: "The model directory (handler.py, sidecar.yaml, ...).")
    var directory: String

    @Option(name: .long, help: "Serve it under this name (default: name in sidecar.yaml, else the directory name).")
    var name: String?

    @Option(name: .long, help: "Worker processes (default: workers in sidecar.yaml).")
    var workers: Int?

    @Flag(name: .long, help: "DIR is a path on the server: load it from there, upload nothing.")
    var onServer = false

    @OptionGroup var admin: AdminArguments

    func run() async throws {
        let client = try admin.client()
        let data: Data
        if onServer {
            struct Body: Encodable {
                var directory: String
                var name: String?
                var workers: Int?
            }
            data = try await client.call(.POST, "/admin/v1/models", json: Body(directory: directory, name: name, workers: workers))
        } else {
            let url = URL(fileURLWithPath: directory)
            // Checked here first, so a typo fails in one line before anything is packed or sent.
            let bundle: ModelBundle
            do { bundle = try ModelBundle(directory: url.path) } catch { throw reportFailure(error) }
            let packed: (data: Data, sha256: String)
            do { packed = try await BundleArchive.pack(directory: url) } catch { throw reportFailure(error) }
            var query = ["name=\(percentEncoded(name ?? bundle.configuration.name))"]
            if let workers { query.append("workers=\(workers)") }
            data = try await client.call(
                .POST, "/admin/v1/bundles?" + query.joined(separator: "&"), body: packed.data,
                headers: [("Sidecar-Bundle-Sha256", packed.sha256)])
        }
        let summary = try JSONDecoder().decode(ModelSummary.self, from: data)
        StandardStreams.line("loaded \(summary.name): \(summary.workers_ready)/\(summary.workers_target) workers ready")
    }

    private func percentEncoded(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed.subtracting(CharacterSet(charactersIn: "&=+"))) ?? text
    }
}

struct UnloadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unload",
        abstract: "Unload a model from a running server: it drains (queued and running requests finish), then cleanup.sh runs.",
        discussion: "Exit codes: 0 unloaded; 1 no such model; 3 unreachable; 4 token.\n\n  sidecar unload iris")

    @Argument(help: "The model's name.")
    var model: String

    @OptionGroup var admin: AdminArguments

    func run() async throws {
        _ = try await admin.client().call(.DELETE, "/admin/v1/models/\(model)")
        StandardStreams.line("unloaded \(model)")
    }
}

struct ReloadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Unload a model and load it again from the same directory: how a FAILED model comes back once fixed.",
        discussion: "Exit codes: 0 reloaded; 1 no such model, or it failed to load again (the error says why); 3 unreachable; 4 token.\n\n  sidecar reload iris")

    @Argument(help: "The model's name.")
    var model: String

    @OptionGroup var admin: AdminArguments

    func run() async throws {
        let data = try await admin.client().call(.POST, "/admin/v1/models/\(model)/reload")
        let summary = try JSONDecoder().decode(ModelSummary.self, from: data)
        StandardStreams.line("reloaded \(summary.name): \(summary.workers_ready)/\(summary.workers_target) workers ready")
    }
}

/// Clients made for a CA file live as long as the process (a client must be shut down before it is
/// released, and the CLI's calls end with the process).
private let keptClients = Mutex<[HTTPClient]>([])
