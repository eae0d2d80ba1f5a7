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
    /// With `serve --repository`: `POST /admin/v1/repository/sync` syncs now.
    var repository: RepositorySync? = nil
    /// Bundles by sha256 (shared with the repository sync): what `sidecar deploy` pushes.
    var store: BundleStore? = nil
    let bundleLimits: BundleArchive.Limits
    /// Scoring jobs over files, started here.
    var jobs = ScoringJobs()

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
        router.get("admin/v1/bundles/{sha256}") { _, context in
            let sha256 = try context.parameters.require("sha256")
            guard store?.directory(for: sha256) != nil else {
                throw FrontError(.notFound, "this node has no bundle \(sha256.prefix(80))")
            }
            return json(["sha256": sha256])
        }
        router.put("admin/v1/bundles/{sha256}") { request, context in try await store(request, context) }
        router.post("admin/v1/deployments") { request, _ in try await deploy(request) }
        router.post("admin/v1/jobs") { request, _ in
            let entry = try jobs.start(try AdminJobRequest.decode(try await body(request, what: "job")), host: host)
            return json(AdminJobStatus(entry), status: .accepted)
        }
        router.get("admin/v1/jobs") { _, _ in json(["jobs": jobs.all.map(AdminJobStatus.init)]) }
        router.get("admin/v1/jobs/{job}") { _, context in json(AdminJobStatus(try jobs.entry(try context.parameters.require("job")))) }
        router.delete("admin/v1/jobs/{job}") { _, context in
            let entry = try jobs.entry(try context.parameters.require("job"))
            entry.job.cancel()
            return json(AdminJobStatus(entry), status: .accepted)
        }
        router.post("admin/v1/repository/sync") { _, _ in
            guard let repository else {
                throw FrontError(.notFound, "this server has no model repository (start it with --repository DIR-OR-URL)")
            }
            return json(await repository.syncNow())
        }
        return router
    }

    private func model(_ context: BasicRequestContext) throws -> Model {
        let name = try context.parameters.require("model")
        guard let model = host.model(named: name) else {
            throw FrontError.from(host.noModel(named: name))
        }
        return model
    }

    private func body(_ request: Request, what: String) async throws -> Data {
        do {
            return Data(buffer: try await request.body.collect(upTo: 1 << 20))
        } catch is NIOTooManyBytesError {
            throw FrontError(.tooLarge, "the \(what) is over 1 MiB; an admin request body is a small JSON object")
        }
    }

    /// A model whose `fallback.model` names no loaded model (or makes a cycle) is unloaded again:
    /// the load is refused with the reason.
    private func checkFallback(of model: Model) async throws {
        do { try host.checkFallbacks(of: model) } catch {
            try? await host.unload(model.name)
            throw error
        }
    }

    /// `POST /admin/v1/models {"directory": "/srv/models/iris", "name": "iris2", "workers": 2}`: a
    /// directory on the server.
    private func load(_ request: Request) async throws -> Response {
        let body = try AdminLoadRequest.decode(try await body(request, what: "load request"))
        do {
            let model = try await host.load(body.directory, workers: body.workers, name: body.name, executor: body.executorKind)
            try await checkFallback(of: model)
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
            guard let n = Int(text), ModelConfiguration.workerRange.contains(n) else {
                throw FrontError(.invalidArgument, "workers must be an integer from 1 to 256, got '\(text.prefix(40))'")
            }
            return n
        }
        let staging = bundleDirectory.appendingPathComponent("\(sha256.prefix(16))-\(UUID().uuidString.prefix(8))")
        do {
            try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
            let directory = try await BundleArchive.unpack(data, sha256: sha256, into: staging, limits: bundleLimits)
            let model = try await host.load(directory.path, workers: workers, name: name)
            try await checkFallback(of: model)
            return json(AdminModel(model), status: .created)
        } catch {
            try? FileManager.default.removeItem(at: staging)
            throw FrontError.from(error)
        }
    }

    /// `PUT /admin/v1/bundles/{sha256}` with a tar.gz body: checked like an upload, then kept by
    /// sha256 for deployments (`sidecar deploy` sends it only to nodes that lack it).
    private func store(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        guard let store else { throw FrontError(.notFound, "this server keeps no bundles") }
        let sha256 = try context.parameters.require("sha256").lowercased()
        let data: Data
        do {
            data = Data(buffer: try await request.body.collect(upTo: bundleLimits.maxCompressedBytes))
        } catch is NIOTooManyBytesError {
            throw FrontError(.tooLarge, "the bundle is over the limit of \(bundleLimits.maxCompressedBytes) bytes (bundle_max_bytes)")
        }
        do {
            _ = try await store.install(data, sha256: sha256)
        } catch {
            throw FrontError.from(error)
        }
        return json(["sha256": sha256], status: .created)
    }

    /// `POST /admin/v1/deployments {"name": "iris", "bundle": SHA256, "version": "3", "workers": 2}`:
    /// serves a stored bundle as `name`, loaded beside what serves and switched to once ready (the
    /// old version drains); answers when it serves.
    private func deploy(_ request: Request) async throws -> Response {
        guard let store else { throw FrontError(.notFound, "this server keeps no bundles") }
        let body = try AdminDeployRequest.decode(try await body(request, what: "deployment"))
        guard let directory = store.directory(for: body.bundle) else {
            throw FrontError(.notFound, "this node has no bundle \(body.bundle.prefix(80)); PUT it to /admin/v1/bundles/SHA256 first")
        }
        do {
            let model = try await host.rollOut(
                directory.path, name: body.name, version: body.version ?? String(body.bundle.prefix(12)), workers: body.workers)
            return json(AdminModel(model))
        } catch {
            throw FrontError.from(error)
        }
    }

    /// `PUT /admin/v1/models/{m}/workers {"workers": 3, "timeout_s": 120, "wait": true}`. With
    /// `"wait": false` it answers 202 at once and the change goes on in the background (watch it with
    /// `GET /admin/v1/models/{m}`).
    private func scale(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let model = try model(context)
        let body = try AdminScaleRequest.decode(try await body(request, what: "scale request"))
        let timeout = body.timeout
        if body.wait == false {
            // Not tied to this request (the caller asked not to wait) but to the host: graceful
            // shutdown waits for it, and the pool's own checks (stopping, FAILED) end it early. The
            // outcome shows in the model's status.
            let (workers, logger) = (body.workers, host.logger)
            host.runInBackground {
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

/// `POST /admin/v1/models`: a directory on the server to load, checked before anything is read
/// from it (the name and worker count by the host's own rules).
struct AdminLoadRequest: Decodable {
    var directory: String
    var name: String?
    var workers: Int?
    /// "process" or "embedded"; nil: the model's sidecar.yaml decides.
    var executor: String?

    var executorKind: ModelConfiguration.ExecutorKind? { executor.flatMap(ModelConfiguration.ExecutorKind.init(rawValue:)) }

    static func decode(_ body: Data) throws -> AdminLoadRequest {
        let request: AdminLoadRequest = try decodeAdminBody(body, what: "load request")
        guard !request.directory.isEmpty, !request.directory.contains("\0") else {
            throw FrontError(.invalidArgument, "directory must be a path on the server")
        }
        if let workers = request.workers, !ModelConfiguration.workerRange.contains(workers) {
            throw FrontError(.invalidArgument, "workers must be from 1 to 256, got \(workers)")
        }
        if let executor = request.executor, ModelConfiguration.ExecutorKind(rawValue: executor) == nil {
            throw FrontError(.invalidArgument, "executor must be process or embedded, got '\(executor.prefix(40))'")
        }
        if let name = request.name, !ModelConfiguration.isValidName(name) {
            throw FrontError(.invalidArgument, "name must be letters, digits, '-', '_' or '.' (at most 200), got '\(name.prefix(200))'")
        }
        return request
    }
}

/// `POST /admin/v1/deployments`.
struct AdminDeployRequest: Decodable {
    var name: String
    var bundle: String
    /// Default: the bundle's first 12 hex digits, the same on every node.
    var version: String?
    var workers: Int?

    static func decode(_ body: Data) throws -> AdminDeployRequest {
        var request: AdminDeployRequest = try decodeAdminBody(body, what: "deployment")
        request.bundle = request.bundle.lowercased()
        guard ModelConfiguration.isValidName(request.name) else {
            throw FrontError(.invalidArgument, "name must be letters, digits, '-', '_' or '.' (at most 200), got '\(request.name.prefix(200))'")
        }
        guard RepositoryManifest.isSHA256(request.bundle) else {
            throw FrontError(.invalidArgument, "bundle must be the bundle's SHA-256 (64 hex digits), got '\(request.bundle.prefix(80))'")
        }
        if let version = request.version, !ModelConfiguration.isValidName(version) {
            throw FrontError(.invalidArgument, "version must be letters, digits, '-', '_' or '.', got '\(version.prefix(80))'")
        }
        if let workers = request.workers, !ModelConfiguration.workerRange.contains(workers) {
            throw FrontError(.invalidArgument, "workers must be from 1 to 256, got \(workers)")
        }
        return request
    }
}

/// `PUT /admin/v1/models/{m}/workers`.
struct AdminScaleRequest: Decodable {
    var workers: Int
    var timeout_s: Double?
    var wait: Bool?

    /// How long the change may take (default 120 s, at most a year).
    var timeout: Duration { Duration.clampedTimeout(timeout_s ?? 120, microsecondsPerUnit: 1_000_000) ?? .seconds(120) }

    static func decode(_ body: Data) throws -> AdminScaleRequest {
        let request: AdminScaleRequest = try decodeAdminBody(body, what: "scale request")
        guard ModelConfiguration.workerRange.contains(request.workers) else {
            throw FrontError(.invalidArgument, "workers must be from 1 to 256, got \(request.workers)")
        }
        if let seconds = request.timeout_s, !(seconds.isFinite && seconds > 0) {
            throw FrontError(.invalidArgument, "timeout_s must be a positive number of seconds, got \(seconds)")
        }
        return request
    }
}

func decodeAdminBody<T: Decodable>(_ body: Data, what: String) throws -> T {
    do {
        return try JSONDecoder().decode(T.self, from: body)
    } catch let error as DecodingError {
        throw FrontError(.invalidArgument, "malformed \(what): \(FrontError.describe(error))")
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
    var executor: String
    @ExplicitNull var executorNote: String?
    var workers: [StatusReport.Worker]
    /// How requests are admitted (the same block as `/status`).
    var admission: StatusReport.Admission
    @ExplicitNull var breaker: StatusReport.Breaker?

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
        case executor, executorNote = "executor_note", admission, breaker
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
        executor = status.executor
        executorNote = status.executorNote
        admission = status.admission
        breaker = status.breaker
    }
}
