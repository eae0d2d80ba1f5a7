import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOFoundationCompat
import Sidecar

/// The admin API: list, load, upload, unload, reload and scale models while the server runs
/// (`sidecar status|load|unload|scale` talk to it). It has its own listener — loopback by default;
/// bound elsewhere it requires a bearer token — so that the inference port can be exposed without
/// exposing control of the server.
///
/// Every change is synchronous: the answer comes when the models are loaded, unloaded or scaled
/// (new workers ready, leaving ones drained), or with an error after the timeout.
struct AdminFront: Sendable {
    let host: ModelHost
    /// When set, every request must carry `Authorization: Bearer <token>`.
    let token: String?
    /// Where uploaded bundles are unpacked, one fresh directory per upload.
    let bundleDirectory: URL
    let bundleLimits: BundleArchive.Limits

    static let sha256Header = HTTPField.Name("Sidecar-Bundle-Sha256")!

    func router() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: BearerTokenMiddleware(token: token))
        let models = router.group("admin/v1/models")
        models.get { _, _ in json(["models": host.modelNames.compactMap { host.model(named: $0) }.map(AdminModel.init)]) }
        models.post { request, _ in try await load(request) }
        models.get("{model}") { _, context in json(AdminModel(try model(context))) }
        models.delete("{model}") { _, context in
            let name = try context.parameters.require("model")
            let directory = host.model(named: name)?.bundle.directory.standardizedFileURL.path
            do { try await host.unload(name) } catch { throw FrontError.from(error) }
            // An uploaded bundle's files go with the model (a directory on the server stays).
            let root = bundleDirectory.standardizedFileURL.path + "/"
            if let directory, directory.hasPrefix(root), let staging = directory.dropFirst(root.count).split(separator: "/").first {
                try? FileManager.default.removeItem(at: bundleDirectory.appendingPathComponent(String(staging)))
            }
            return json(["unloaded": name])
        }
        models.post("{model}/reload") { _, context in
            let name = try context.parameters.require("model")
            do { return json(AdminModel(try await host.reload(name))) } catch { throw FrontError.from(error) }
        }
        models.put("{model}/workers") { request, context in try await scale(request, context) }
        router.post("admin/v1/bundles") { request, _ in try await upload(request) }
        return router
    }

    private func model(_ context: BasicRequestContext) throws -> Model {
        let name = try context.parameters.require("model")
        guard let model = host.model(named: name) else {
            throw FrontError(.notFound, "no model named '\(name)'; loaded: \(host.modelNames.joined(separator: ", "))")
        }
        return model
    }

    private func decode<T: Decodable>(_ type: T.Type, _ request: Request, what: String) async throws -> T {
        let body = try await request.body.collect(upTo: 1 << 20)
        do {
            return try JSONDecoder().decode(T.self, from: Data(buffer: body))
        } catch let error as DecodingError {
            throw FrontError(.invalidArgument, "malformed \(what): \(FrontError.describe(error))")
        }
    }

    /// `POST /admin/v1/models {"directory": "/srv/models/iris", "name": "iris2", "workers": 2}`: a
    /// directory on the server.
    private func load(_ request: Request) async throws -> Response {
        struct Body: Decodable {
            var directory: String
            var name: String?
            var workers: Int?
        }
        let body = try await decode(Body.self, request, what: "load request")
        do {
            let model = try await host.load(body.directory, workers: body.workers, name: body.name)
            return json(AdminModel(model), status: .created)
        } catch {
            throw FrontError.from(error)
        }
    }

    /// `POST /admin/v1/bundles?name=NAME&workers=N` with a tar.gz body and its sha256 in
    /// `Sidecar-Bundle-Sha256`: checked before anything is unpacked (size, hash, every entry), then
    /// unpacked into a fresh directory under the bundle directory and loaded from there.
    private func upload(_ request: Request) async throws -> Response {
        guard let sha256 = request.headers[Self.sha256Header]?.lowercased(), sha256.count == 64, sha256.allSatisfy(\.isHexDigit) else {
            throw FrontError(.invalidArgument, "send the bundle's sha256 (64 hex digits) in the Sidecar-Bundle-Sha256 header")
        }
        let data: Data
        do {
            data = Data(buffer: try await request.body.collect(upTo: bundleLimits.maxCompressedBytes))
        } catch is NIOTooManyBytesError {
            throw FrontError(.tooLarge, "the bundle is over the limit of \(bundleLimits.maxCompressedBytes) bytes (bundle_max_bytes)")
        }
        let name = request.uri.queryParameters.get("name")
        let workers = try request.uri.queryParameters.get("workers").map { text -> Int in
            guard let n = Int(text), n >= 1 else { throw FrontError(.invalidArgument, "workers must be a positive integer, got '\(text)'") }
            return n
        }
        let staging = bundleDirectory.appendingPathComponent("\(sha256.prefix(16))-\(UUID().uuidString.prefix(8))")
        do {
            try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
            let directory = try await BundleArchive.unpack(data, sha256: sha256, into: staging, limits: bundleLimits)
            let model = try await host.load(directory.path, workers: workers, name: name)
            return json(AdminModel(model), status: .created)
        } catch {
            try? FileManager.default.removeItem(at: staging)
            throw FrontError.from(error)
        }
    }

    /// `PUT /admin/v1/models/{m}/workers {"workers": 3, "timeout_s": 120, "wait": true}`. With
    /// `"wait": false` it answers 202 at once and the change goes on in the background (watch it with
    /// `GET /admin/v1/models/{m}`).
    private func scale(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        struct Body: Decodable {
            var workers: Int
            var timeout_s: Double?
            var wait: Bool?
        }
        let model = try model(context)
        let body = try await decode(Body.self, request, what: "scale request")
        guard body.workers >= 1, body.workers <= 256 else {
            throw FrontError(.invalidArgument, "workers must be from 1 to 256, got \(body.workers)")
        }
        let timeout = Duration.milliseconds(Int64((body.timeout_s ?? 120) * 1000))
        if body.wait == false {
            // Not tied to this request: the caller asked not to wait. The pool's own checks (stopping,
            // FAILED) still apply; the outcome shows in the model's status.
            let (workers, logger) = (body.workers, host.logger)
            Task {
                do { try await model.scale(to: workers, timeout: timeout) } catch {
                    logger.warning("scaling '\(model.name)' to \(workers) workers: \(error)")
                }
            }
            return json(AdminModel(model), status: .accepted)
        }
        do {
            try await model.scale(to: body.workers, timeout: timeout)
        } catch {
            throw FrontError.from(error)
        }
        return json(AdminModel(model))
    }
}

/// Refuses requests without the admin token. Constant-time comparison of digests, so the token
/// cannot be guessed byte by byte from response times.
struct BearerTokenMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let token: String?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let token else { return try await next(request, context) }
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer ") else {
            throw FrontError(.unauthenticated, "the admin API needs 'Authorization: Bearer <token>' (the server's admin token)")
        }
        let given = SHA256.hash(data: Data(header.dropFirst("Bearer ".count).utf8))
        let expected = SHA256.hash(data: Data(token.utf8))
        guard given == expected else { throw FrontError(.permissionDenied, "the admin token is wrong") }
        return try await next(request, context)
    }
}

/// One model as the admin API and `sidecar status` show it.
struct AdminModel: Encodable {
    var name: String
    var state: String
    @ExplicitNull var reason: String?
    var directory: String
    var workersReady: Int
    var workersTarget: Int
    var queued: Int
    var requestsPerSecond: Double
    @ExplicitNull var p99Milliseconds: Double?
    var restarts: Int
    @ExplicitNull var autoscaling: Autoscaling?
    var workers: [StatusReport.Worker]

    struct Autoscaling: Encodable {
        var min: Int
        var max: Int
        var enabled: Bool
        var lastDecision: String?
        var lastDecisionAt: String?

        enum CodingKeys: String, CodingKey {
            case min, max, enabled, lastDecision = "last_decision", lastDecisionAt = "last_decision_at"
        }
    }

    enum CodingKeys: String, CodingKey {
        case name, state, reason, directory, workersReady = "workers_ready", workersTarget = "workers_target", queued
        case requestsPerSecond = "requests_per_second", p99Milliseconds = "p99_ms", restarts, autoscaling, workers
    }

    init(_ model: Model) {
        let status = StatusReport.model(model)
        let traffic = model.recentTraffic
        name = model.name
        state = status.state
        reason = status.reason
        directory = model.bundle.directory.path
        let workers = model.workers
        workersReady = workers.filter { $0.state.isServing }.count
        workersTarget = workers.count
        queued = model.queuedItems
        requestsPerSecond = (traffic.requestsPerSecond * 10).rounded() / 10
        p99Milliseconds = traffic.p99.map { ($0.inMilliseconds * 10).rounded() / 10 }
        restarts = workers.reduce(0) { $0 + $1.restarts }
        autoscaling = model.autoscaler.map { a in
            Autoscaling(
                min: a.min, max: a.max, enabled: a.enabled, lastDecision: a.lastDecision,
                lastDecisionAt: a.lastDecisionAt.map { ISO8601DateFormatter().string(from: $0) })
        }
        self.workers = status.workers
    }
}
