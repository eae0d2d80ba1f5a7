import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Options for a ``ModelHost``.
public struct HostOptions: Sendable {
    public var environment: EnvironmentOptions
    /// The largest message between the supervisor and a worker (default 256 MiB).
    public var maxMessageBytes: Int
    /// Where worker sockets go; default a fresh directory under `/tmp`.
    public var socketDirectory: URL?
    /// Benchmarking only: models answer every item with itself in Swift (``EchoExecutor``) and start
    /// no Python workers, so that a load test measures the front and the batcher alone.
    public var benchmarkEcho: Bool

    public init(
        environment: EnvironmentOptions = EnvironmentOptions(), maxMessageBytes: Int = 256 << 20, socketDirectory: URL? = nil,
        benchmarkEcho: Bool = false
    ) {
        self.environment = environment
        self.maxMessageBytes = maxMessageBytes
        self.socketDirectory = socketDirectory
        self.benchmarkEcho = benchmarkEcho
    }
}

/// Owns the models of one node: builds their environments, runs their executors, unloads them.
///
/// The CLI, the library API and the network front all drive the same host. Its ``run()`` holds every
/// executor's task, so nothing outlives it; ``withModelHost(options:logger:_:)`` runs it for the
/// duration of a closure.
public final class ModelHost: Service, Sendable {
    public let options: HostOptions
    public let logger: Logger
    let socketRoot: URL

    private struct State {
        /// Each name and the model it serves now (for a name loaded from a repository, the
        /// version with the largest share).
        var models: [String: Model] = [:]
        /// The names loaded from a repository: every version loaded, and how traffic is split.
        var versions: [String: Versions] = [:]
        /// Keys (``ModelHost/key(_:_:)``) of the loads under way.
        var loading: Set<String> = []
        var nextModelID = 0
        var shuttingDown = false
        /// By key: ends when that model's executor has stopped.
        var finished: [String: AsyncStream<Void>] = [:]
    }

    private struct Versions {
        var loaded: [String: Model] = [:]
        var split = TrafficSplit([])
    }

    /// One loaded model's key: its name, or `name@version` for a repository version ('@' is not
    /// allowed in names, so the two never collide).
    static func key(_ name: String, _ version: String?) -> String {
        version.map { "\(name)@\($0)" } ?? name
    }

    private let state = Mutex(State())
    private let starts: AsyncStream<@Sendable () async -> Void>
    private let startSink: AsyncStream<@Sendable () async -> Void>.Continuation

    public init(options: HostOptions = HostOptions(), logger: Logger = Logger(label: "sidecar")) {
        self.options = options
        self.logger = logger
        self.socketRoot = options.socketDirectory
            ?? URL(fileURLWithPath: "/tmp/sidecar-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        (starts, startSink) = AsyncStream.makeStream()
    }

    /// Runs the executors of the loaded models until ``shutdown()``; on graceful shutdown of the
    /// service group it unloads every model first.
    public func run() async {
        await withTaskGroup(of: Void.self) { group in
            // In a ServiceGroup, a graceful shutdown unloads every model (draining the workers) and
            // ends the loop below; outside one this child just waits to be cancelled.
            group.addTask {
                if (try? await gracefulShutdown()) != nil { await self.shutdown() }
            }
            await withDiscardingTaskGroup { executors in
                for await start in starts {
                    executors.addTask { await start() }
                }
            }
            group.cancelAll()
        }
        try? FileManager.default.removeItem(at: socketRoot)
    }

    /// Runs `work` as a child of ``run()``: work that outlives the request that asked for it (a scale
    /// with `"wait": false`) still ends before the host does, so graceful shutdown waits for it and
    /// nothing runs on after the models are unloaded. Dropped if the host is already shutting down.
    public func runInBackground(_ work: @escaping @Sendable () async -> Void) {
        let accepted = state.withLock { !$0.shuttingDown }
        if accepted { startSink.yield(work) }
    }

    /// The error for a model name that is not loaded, listing those that are.
    public func noModel(named name: String) -> SidecarError {
        let loaded = modelNames
        return SidecarError(.notFound, "no model named '\(name)'; loaded: \(loaded.isEmpty ? "none" : loaded.joined(separator: ", "))")
    }

    /// Names of the loaded models.
    public var modelNames: [String] { state.withLock { $0.models.keys.sorted() } }

    /// The loaded model called `name` (for a name with several versions, the one with the largest share).
    public func model(named name: String) -> Model? { state.withLock { $0.models[name] } }

    /// The model that answers a request for `name`: `version` if the request names one, else a
    /// version picked by the name's traffic split (by `routingKey`, a request id, when there is
    /// one, so that the same id reaches the same version). Throws `notFound` naming what is loaded.
    public func resolve(_ name: String, version: String? = nil, routingKey: String? = nil) throws -> Model {
        let version = version.flatMap { $0.isEmpty ? nil : $0 }
        let found: Model? = try state.withLock { state in
            if let versions = state.versions[name] {
                guard let version else {
                    return versions.split.pick(key: routingKey).flatMap { versions.loaded[$0] } ?? state.models[name]
                }
                guard let model = versions.loaded[version] else {
                    throw SidecarError(
                        .notFound, "model '\(name)' has no version '\(version)' loaded; loaded versions: \(versions.loaded.keys.sorted().joined(separator: ", "))")
                }
                return model
            }
            guard let model = state.models[name] else { return nil }
            if let version, version != "1" {
                throw SidecarError(.notFound, "model '\(name)' has no version '\(version)'; it serves version 1")
            }
            return model
        }
        guard let found else { throw noModel(named: name) }
        return found
    }

    /// The fronts' look before a request's body is read: throws what the request would be told if
    /// nothing it could reach can take it now (closed, queue full, at its adaptive limit). A name
    /// split across versions, asked without a version (the request id that picks one is in the
    /// body), is refused only when every version with a share refuses.
    public func refuseEarly(_ name: String, version: String? = nil) throws {
        let version = version.flatMap { $0.isEmpty ? nil : $0 }
        let candidates: [Model] = state.withLock { state in
            guard version == nil, let versions = state.versions[name] else { return [] }
            return versions.split.shares.compactMap { versions.loaded[$0.version] }
        }
        guard candidates.count > 1 else { return try resolve(name, version: version).refuseEarly() }
        var refusal: (any Error)?
        for model in candidates {
            do { try model.refuseEarly(); return } catch { refusal = error }
        }
        if let refusal { throw refusal }
    }

    /// Every loaded model, each version of a name on its own, by name then version.
    public var loadedModels: [Model] {
        state.withLock { state in
            state.models.keys.sorted().flatMap { name -> [Model] in
                guard let versions = state.versions[name] else { return state.models[name].map { [$0] } ?? [] }
                return versions.loaded.keys.sorted { $0.localizedStandardCompare($1) == .orderedAscending }.compactMap { versions.loaded[$0] }
            }
        }
    }

    /// The versions of `name` that are loaded and how its traffic is split (nil: not a repository name).
    public func versions(of name: String) -> (loaded: [String], split: TrafficSplit)? {
        state.withLock { state in
            state.versions[name].map { ($0.loaded.keys.sorted { $0.localizedStandardCompare($1) == .orderedAscending }, $0.split) }
        }
    }

    /// The versions metadata lists for `model`'s name: every loaded version, or "1".
    public func versionNames(of model: Model) -> [String] {
        versions(of: model.name)?.loaded ?? [model.servedVersion]
    }

    /// Serves `version` of `name` from `path`: loaded beside what serves (reused if already loaded),
    /// given all of the name's traffic once ready, then the other versions drain for `drain` and are
    /// unloaded. A push deploy (`sidecar deploy`) to a node does this; a repository node does the
    /// same through its sync.
    @discardableResult
    public func rollOut(_ path: String, name: String, version: String, workers: Int? = nil, drain: Duration = .seconds(2)) async throws -> Model {
        let model: Model
        if versions(of: name)?.loaded.contains(version) == true {
            model = try resolve(name, version: version)
        } else {
            model = try await load(path, name: name, version: version, workers: workers)
        }
        try route(name, TrafficSplit([.init(version: version, weight: 100, label: "stable")]))
        let old = (versions(of: name)?.loaded ?? []).filter { $0 != version }
        if !old.isEmpty { try? await Task.sleep(for: drain) }
        for previous in old { try? await unload(name, version: previous) }
        return model
    }

    /// Points `name` at its loaded versions with `split`'s shares, at once: requests resolved from
    /// now on reach the new split; the previous version keeps answering what it was given.
    public func route(_ name: String, _ split: TrafficSplit) throws {
        try state.withLock { state in
            guard var versions = state.versions[name] else {
                throw SidecarError(.notFound, "no repository model named '\(name)' is loaded")
            }
            let missing = split.shares.map(\.version).filter { versions.loaded[$0] == nil }
            guard missing.isEmpty else {
                throw SidecarError(.notFound, "model '\(name)' cannot serve version(s) \(missing.joined(separator: ", ")): not loaded")
            }
            guard let primary = split.primary, let model = versions.loaded[primary] else {
                throw SidecarError(.invalidInput, "model '\(name)': a traffic split needs a version with a positive weight")
            }
            versions.split = split
            state.versions[name] = versions
            state.models[name] = model
        }
    }

    /// Loads the model directory at `path`: checks it, builds or reuses its environment, runs its
    /// `init.sh`, starts its workers and returns once all of them are ready.
    ///
    /// - Parameters:
    ///   - workers: overrides `workers` from `sidecar.yaml`.
    ///   - executor: overrides `executor` from `sidecar.yaml`.
    @discardableResult
    public func load(_ path: String, workers: Int? = nil, name: String? = nil, executor: ModelConfiguration.ExecutorKind? = nil) async throws -> Model {
        try await load(path, workers: workers, name: name, executor: executor, version: nil, forgetEmbeddedCrash: false)
    }

    /// Loads `version` of the repository model `name` from `path`, beside the versions already
    /// loaded. It serves nothing until ``route(_:_:)`` gives it a share: a new version is switched
    /// to only once it is ready.
    @discardableResult
    public func load(_ path: String, name: String, version: String, workers: Int? = nil) async throws -> Model {
        try await load(path, workers: workers, name: name, executor: nil, version: version, forgetEmbeddedCrash: false)
    }

    /// `forgetEmbeddedCrash`: an operator asked for the model again (a reload), so a crash its
    /// embedded executor caused no longer sends it to process workers.
    private func load(
        _ path: String, workers: Int?, name: String?, executor: ModelConfiguration.ExecutorKind?, version: String?,
        forgetEmbeddedCrash: Bool
    ) async throws -> Model {
        var bundle = try ModelBundle(directory: path)
        if let name {
            guard ModelConfiguration.isValidName(name) else {
                throw SidecarError(.invalidInput, "a model name must be letters, digits, '-', '_' or '.' (at most 200; it appears in URLs), got '\(name.prefix(200))'")
            }
            bundle.configuration.name = name
        }
        if let workers {
            guard ModelConfiguration.workerRange.contains(workers) else {
                throw SidecarError(.invalidInput, "workers must be from \(ModelConfiguration.workerRange.lowerBound) to \(ModelConfiguration.workerRange.upperBound), got \(workers)")
            }
            bundle.configuration.workers = workers
            bundle.configuration.autoscaling = nil  // a fixed count asked for explicitly
        }
        if let executor {
            bundle.configuration.executor = executor
            if executor == .embedded, workers == nil {
                // sidecar.yaml's worker count is for process workers; asked to embed, run one thread.
                bundle.configuration.workers = 1
                bundle.configuration.autoscaling = nil
            }
        }
        if let workers, workers != 1, bundle.configuration.executor == .embedded {
            throw SidecarError(
                .invalidConfiguration,
                "model '\(bundle.configuration.name)' runs embedded (executor: embedded), in one thread of the server, so it cannot have the \(workers) workers asked for; ask for 1, or run it with executor: process")
        }
        try bundle.configuration.checkExecutor(file: bundle.directory.appendingPathComponent("sidecar.yaml").path)
        let modelName = bundle.configuration.name
        let key = Self.key(modelName, version)
        let id: Int = try state.withLock { state in
            guard !state.shuttingDown else { throw SidecarError(.unavailable, "the host is shutting down") }
            if let version {
                guard state.versions[modelName] != nil || (state.models[modelName] == nil && !state.loading.contains(modelName)) else {
                    throw SidecarError(.conflict, "a model named '\(modelName)' is already loaded from a directory; unload it before serving that name from a repository")
                }
                guard state.versions[modelName]?.loaded[version] == nil, !state.loading.contains(key) else {
                    throw SidecarError(.conflict, "version '\(version)' of model '\(modelName)' is already loaded")
                }
            } else {
                guard state.models[modelName] == nil, state.versions[modelName] == nil, !state.loading.contains(modelName) else {
                    throw SidecarError(.conflict, "a model named '\(modelName)' is already loaded; unload it first or give this one another name")
                }
            }
            state.loading.insert(key)
            state.nextModelID += 1
            return state.nextModelID
        }
        defer { state.withLock { _ = $0.loading.remove(key) } }

        var modelLogger = logger
        modelLogger[metadataKey: "model"] = "\(modelName)"
        if let version { modelLogger[metadataKey: "version"] = "\(version)" }
        try await EntryPointCheck.verify(bundle, interpreter: try InterpreterLocator.resolve(bundle.configuration.python.interpreter))
        let environment = try await EnvironmentBuilder(options: options.environment, logger: modelLogger).prepare(bundle)

        // A crash that the embedded executor caused last time sends the model to process workers.
        var executorNote: String?
        var crashRecord: CrashRecord?
        let embeddedDirectory = CrashRecord.directory(cache: options.environment.cacheDirectory)
        if bundle.configuration.executor == .embedded, !options.benchmarkEcho {
            let (record, crash) = try CrashRecord.open(directory: embeddedDirectory, model: modelName)
            if let crash, !forgetEmbeddedCrash {
                let note = "\(crash.summary); it runs with process workers until it is reloaded (sidecar reload \(modelName))"
                modelLogger.error("\(note)", metadata: crash.faultLog.map { ["fault_log": "\($0)"] } ?? [:])
                executorNote = note
                bundle.configuration.executor = .process
            } else {
                if crash != nil { record?.clear() }
                crashRecord = record
                if record == nil {
                    modelLogger.warning("another server is running model '\(modelName)' embedded with the same cache directory; this one keeps no crash record for it")
                }
            }
        }
        let socketDirectory = socketRoot.appendingPathComponent("\(id)")
        try FileManager.default.createDirectory(at: socketDirectory, withIntermediateDirectories: true)
        let config = bundle.configuration
        let batcher = Batcher(
            modelName: modelName, batching: config.batching, maxRetries: config.maxRetries, retry: config.retry,
            defaultTimeout: config.timeouts.request)
        let spec = WorkerSpec(
            model: modelName, python: environment.python, modelDirectory: bundle.directory, handler: config.handler,
            handlerConfig: config.handlerConfig, socketDirectory: socketDirectory, timeouts: config.timeouts,
            maxMessageBytes: options.maxMessageBytes, window: 2, recycle: config.recycle)
        let pool: any Executor
        if options.benchmarkEcho {
            pool = EchoExecutor(batcher: batcher, lanes: config.workers)
        } else if config.executor == .embedded {
            let module = String(config.handler.prefix { $0 != ":" && $0 != "." })
            try EmbeddedInterpreter.shared.admit(model: modelName, environment: environment.directory, module: module)
            pool = EmbeddedExecutor(
                spec: spec, environment: environment, batcher: batcher, record: crashRecord,
                faultLog: CrashRecord.faultLog(in: embeddedDirectory, pid: getpid()), logger: modelLogger)
        } else {
            pool = WorkerPool(
                spec: spec, size: config.workers, batcher: batcher, policy: config.restartPolicy, autoscaling: config.autoscaling,
                logger: modelLogger)
        }
        if options.benchmarkEcho {
            modelLogger.warning("--benchmark-echo: every item is answered with itself in Swift; the handler does not run")
        }
        let model = Model(
            bundle: bundle, environment: environment, batcher: batcher, executor: pool, requestedWorkers: workers,
            requestedExecutor: executor, executorNote: executorNote, version: version, logger: modelLogger)
        model.modelGuard.setLookup { [weak self] name in try? self?.resolve(name) }

        let (finished, finishedSink) = AsyncStream.makeStream(of: Void.self)
        state.withLock { $0.finished[key] = finished }
        modelLogger.info(config.executor == .embedded ? "starting the embedded executor" : "starting \(config.workers) worker(s)")
        startSink.yield {
            await pool.run()
            finishedSink.finish()
        }
        do {
            try await pool.waitUntilReady()
        } catch {
            pool.stop()
            for await _ in finished {}
            state.withLock { _ = $0.finished.removeValue(forKey: key) }
            throw error
        }
        state.withLock { state in
            if let version {
                state.versions[modelName, default: Versions()].loaded[version] = model
            } else {
                state.models[modelName] = model
            }
        }
        modelLogger.info("model ready", metadata: ["workers": "\(config.workers)", "environment": "\(environment.directory.path)"])
        return model
    }

    /// Checks every loaded model's `fallback.model` (or only `model`'s): it must name a loaded
    /// model, and following fallbacks must not come back to where it started. Called once the
    /// server's start models have loaded (they load in parallel, so a fallback may load after its
    /// primary), and after each later load.
    public func checkFallbacks(of model: Model? = nil) throws {
        let primaries = model.map { [$0] } ?? state.withLock { state in
            Array(state.models.values) + state.versions.values.flatMap { $0.loaded.values }
        }
        for primary in primaries {
            let file = primary.bundle.directory.appendingPathComponent("sidecar.yaml").path
            var chain = [primary.name]
            var current = primary
            while case .model(let next)? = current.configuration.fallback?.target {
                guard let target = try? resolve(next) else {
                    throw SidecarError(
                        .invalidModel,
                        "\(file): 'fallback.model' of model '\(current.name)' names '\(next)', which is not loaded; load it too, or name a model that is")
                }
                guard !chain.contains(next) else {
                    throw SidecarError(.invalidModel, "\(file): 'fallback.model' makes a cycle: \((chain + [next]).joined(separator: " → ")); a fallback must not fall back to its primary")
                }
                chain.append(next)
                current = target
            }
        }
    }

    /// Stops taking requests for `name` (every version of it), lets queued and in-flight items
    /// finish, stops its workers, then runs its `cleanup.sh`.
    public func unload(_ name: String) async throws {
        let stopping: [(Model, AsyncStream<Void>?)] = state.withLock { state in
            let primary = state.models.removeValue(forKey: name)
            let versions = state.versions.removeValue(forKey: name)
            let models = versions.map { Array($0.loaded.values) } ?? primary.map { [$0] } ?? []
            return models.map { ($0, state.finished.removeValue(forKey: Self.key(name, $0.version))) }
        }
        guard !stopping.isEmpty else { throw noModel(named: name) }
        await withDiscardingTaskGroup { group in
            for (model, finished) in stopping {
                group.addTask { await self.stop(model, finished: finished) }
            }
        }
    }

    /// Unloads one version of a repository model; the version must have no share of its traffic
    /// (route the name away from it first).
    public func unload(_ name: String, version: String) async throws {
        let (model, finished): (Model, AsyncStream<Void>?) = try state.withLock { state in
            guard var versions = state.versions[name], let model = versions.loaded[version] else {
                throw SidecarError(.notFound, "model '\(name)' has no version '\(version)' loaded")
            }
            guard !versions.split.shares.contains(where: { $0.version == version }) else {
                throw SidecarError(.conflict, "version '\(version)' of model '\(name)' still serves; route its traffic elsewhere first")
            }
            versions.loaded[version] = nil
            if versions.loaded.isEmpty {
                state.versions[name] = nil
                state.models[name] = nil
            } else {
                state.versions[name] = versions
            }
            return (model, state.finished.removeValue(forKey: Self.key(name, version)))
        }
        await stop(model, finished: finished)
    }

    private func stop(_ model: Model, finished: AsyncStream<Void>?) async {
        let name = model.name
        model.executor.stop()
        if let finished { for await _ in finished {} }
        if model.started, let cleanup = model.bundle.cleanupScript {
            var modelLogger = logger
            modelLogger[metadataKey: "model"] = "\(name)"
            let outcome = try? await ProcessRunner.run(
                "/bin/bash", [cleanup.path], workingDirectory: model.bundle.directory,
                environment: HookEnvironment.variables(bundle: model.bundle, environment: model.environment),
                logger: modelLogger, label: "cleanup.sh")
            if let outcome, !outcome.succeeded {
                modelLogger.error("\(cleanup.path) failed (\(outcome.status))")
            }
        }
        logger.info("model unloaded", metadata: ["model": "\(name)", "version": "\(model.servedVersion)"])
    }

    /// Unloads `name` and loads it again from the same directory with what it was loaded with (a
    /// worker count given to `load`, else `sidecar.yaml`'s, autoscaling included): how a model that
    /// went FAILED (or whose files changed) comes back. A model that runs with process workers
    /// because its embedded executor crashed the server runs embedded again. If loading fails, the model stays listed as
    /// FAILED with the reason (its requests refused with it) until the next reload or an unload.
    @discardableResult
    public func reload(_ name: String) async throws -> Model {
        guard let model = model(named: name) else { throw noModel(named: name) }
        if model.version != nil {
            throw SidecarError(
                .conflict,
                "model '\(name)' is served from the model repository: publish a new version (sidecar publish) or point it back (sidecar rollback), and every node follows")
        }
        try await unload(name)
        do {
            return try await load(
                model.bundle.directory.path, workers: model.requestedWorkers, name: name, executor: model.requestedExecutor,
                version: nil, forgetEmbeddedCrash: true)
        } catch {
            // Refused as a FAILED model is (503 / UNAVAILABLE), with the load error as the reason.
            let cause = error as? SidecarError
            let failure = SidecarError(
                .unavailable,
                "model '\(name)' is FAILED: reloading it failed: \(cause?.message ?? "\(error)"). Fix the cause, then reload it (sidecar reload \(name)).",
                detail: cause?.detail, cause: error)
            let batcher = Batcher(modelName: name, batching: model.configuration.batching, maxRetries: 0)
            batcher.fail(failure)
            let standIn = Model(
                bundle: model.bundle, environment: model.environment, batcher: batcher, executor: FailedExecutor(failure: failure),
                requestedWorkers: model.requestedWorkers, requestedExecutor: model.requestedExecutor, started: false, logger: logger)
            standIn.modelGuard.setLookup { [weak self] name in try? self?.resolve(name) }
            state.withLock { state in
                if state.models[name] == nil, !state.shuttingDown { state.models[name] = standIn }
            }
            logger.error("reloading '\(name)' failed; it stays listed as FAILED: \(failure.message)")
            throw error
        }
    }

    /// Unloads every model and ends ``run()``.
    public func shutdown() async {
        let names: [String] = state.withLock { state in
            state.shuttingDown = true
            return Array(state.models.keys)
        }
        await withDiscardingTaskGroup { group in
            for name in names {
                group.addTask { try? await self.unload(name) }
            }
        }
        startSink.finish()
    }
}

/// Runs a ``ModelHost`` for the duration of `body`, then unloads every model and stops every worker.
public func withModelHost<Result: Sendable>(
    options: HostOptions = HostOptions(),
    logger: Logger = Logger(label: "sidecar"),
    _ body: (ModelHost) async throws -> Result
) async throws -> Result {
    let host = ModelHost(options: options, logger: logger)
    return try await withThrowingTaskGroup(of: Void.self, returning: Result.self) { group in
        group.addTask { await host.run() }
        let result: Result
        do {
            result = try await body(host)
        } catch {
            await host.shutdown()
            try? await group.waitForAll()
            throw error
        }
        await host.shutdown()
        try await group.waitForAll()
        return result
    }
}

/// Loads the model directory at `path` with `workers` worker processes (or `executor: .embedded`,
/// inside this process), runs `body` with it, then stops the workers.
///
/// ```swift
/// let predictions = try await withModel(at: "Examples/echo", workers: 2) { model in
///     try await model.predict(batch: items)
/// }
/// ```
public func withModel<Result: Sendable>(
    at path: String,
    workers: Int? = nil,
    executor: ModelConfiguration.ExecutorKind? = nil,
    options: HostOptions = HostOptions(),
    logger: Logger = Logger(label: "sidecar"),
    _ body: (Model) async throws -> Result
) async throws -> Result {
    try await withModelHost(options: options, logger: logger) { host in
        let model = try await host.load(path, workers: workers, executor: executor)
        return try await body(model)
    }
}
