import Foundation
import Logging

/// A loaded model: send it items, get predictions.
///
/// ```swift
/// try await withModel(at: "Examples/iris", workers: 2) { model in
///     let label = try await model.predict(JSONValue(json: "[5.1, 3.5, 1.4, 0.2]"))
///     print(label.json)   // "setosa"
/// }
/// ```
///
/// Concurrent callers share batches: the batcher groups whatever is queued when a worker is free.
public final class Model: Sendable {
    public let name: String
    /// The repository version this is (nil for a model loaded from a directory, which serves
    /// version "1" to the protocols).
    public let version: String?
    public let bundle: ModelBundle
    public let environment: PythonEnvironment
    let batcher: Batcher
    let executor: any Executor
    /// The worker count `load` was given (nil: `sidecar.yaml`'s, autoscaling included): what a
    /// reload asks for again, so that a reload restores autoscaling that `scale` turned off.
    let requestedWorkers: Int?
    /// The executor `load` was given (nil: `sidecar.yaml`'s).
    let requestedExecutor: ModelConfiguration.ExecutorKind?
    private let fallbackNote: String?
    /// False for the stand-in of a model whose reload failed (``FailedExecutor``): it never ran, so
    /// unloading it runs no `cleanup.sh`.
    let started: Bool
    /// The fallback and circuit breaker (`fallback:`, `breaker:`).
    let modelGuard: ModelGuard

    init(
        bundle: ModelBundle, environment: PythonEnvironment, batcher: Batcher, executor: any Executor, requestedWorkers: Int?,
        requestedExecutor: ModelConfiguration.ExecutorKind? = nil, executorNote: String? = nil, started: Bool = true,
        version: String? = nil, logger: Logger = Logger(label: "sidecar")
    ) {
        self.modelGuard = ModelGuard(configuration: bundle.configuration, logger: logger)
        self.name = bundle.configuration.name
        self.version = version
        self.bundle = bundle
        self.environment = environment
        self.batcher = batcher
        self.executor = executor
        self.requestedWorkers = requestedWorkers
        self.requestedExecutor = requestedExecutor
        self.fallbackNote = executorNote
        self.started = started
    }

    public var configuration: ModelConfiguration { bundle.configuration }

    /// The version the protocols report (`model_version`).
    public var servedVersion: String { version ?? "1" }

    /// Where the handler runs: `configuration.executor`, which is `process` for a model whose
    /// embedded executor crashed the server (``executorNote`` says so).
    public var executorKind: ModelConfiguration.ExecutorKind { configuration.executor }

    /// What an operator should know about the executor: why an embedded model runs with process
    /// workers, or which models share the embedded interpreter (and the GIL) with this one.
    public var executorNote: String? { fallbackNote ?? executor.note }

    /// Predicts one item. Throws ``PredictionError`` when the handler failed for it, and
    /// ``SidecarError`` when the model cannot take it (queue full, stopped, FAILED) or `deadline`
    /// (else `timeouts.request_timeout_s`) passed first. With a `fallback:`, the fallback answers
    /// the failures it covers.
    public func predict(_ item: JSONValue, deadline: ContinuousClock.Instant? = nil) async throws -> JSONValue {
        try await predict(batch: [item], deadline: deadline)[0].get()
    }

    /// Predicts many items in one call: one result per item, in order. One item's failure does not
    /// fail the others. Throws only when the model cannot take the items at all.
    public func predict(batch items: [JSONValue], deadline: ContinuousClock.Instant? = nil) async throws -> [ItemResult] {
        try await servePredictions(items, deadline: deadline).value
    }

    /// ``predict(batch:deadline:)``, saying whether the fallback answered (and why). The items the
    /// handler raised for are answered by the fallback when `fallback.on` has `error`.
    public func servePredictions(_ items: [JSONValue], deadline: ContinuousClock.Instant? = nil) async throws -> Served<[ItemResult]> {
        guard modelGuard.isActive else { return Served(value: try await submitPredictions(items, deadline: deadline), fallback: nil) }
        var served = try await modelGuard.serve(
            deadline: deadline,
            primary: { try await self.submitPredictions(items, deadline: deadline) },
            failed: { results in results.contains { Self.reason($0) != nil } },
            alternative: { model in try await self.fallbackPredictions(items, from: model, deadline: deadline) })
        guard served.fallback == nil else { return served }
        // Items the handler raised for (or whose worker died), answered one by one by the fallback.
        let reasons = served.value.map(Self.reason)
        let failed = reasons.indices.filter { reasons[$0].map(modelGuard.covers) ?? false }
        guard !failed.isEmpty else { return served }
        let reason: FallbackReason = failed.allSatisfy { reasons[$0] == .error } ? .error : .unavailable
        let retried = failed.map { items[$0] }
        if let answer = try await modelGuard.answer(reason, { model in try await self.fallbackPredictions(retried, from: model, deadline: deadline) }) {
            for (index, result) in zip(failed, answer.value) { served.value[index] = result }
            served.fallback = answer.fallback
        }
        return served
    }

    /// Why an item failed, as the fallback and the breaker see it (nil: it did not, or not the model's fault).
    private static func reason(_ result: ItemResult) -> FallbackReason? {
        guard case .failure(let error) = result else { return nil }
        return FallbackReason.of(error)
    }

    /// The fallback's predictions: the fallback model's (without its own fallback), or the fixed response per item.
    private func fallbackPredictions(_ items: [JSONValue], from model: Model?, deadline: ContinuousClock.Instant?) async throws -> [ItemResult]? {
        if let model { return try await model.submitPredictions(items, deadline: ModelGuard.fallbackDeadline(deadline)) }
        guard case .response(let value)? = modelGuard.fallback?.target else { return nil }
        return items.map { _ in .success(value) }
    }

    /// ``predict(batch:deadline:)`` without the fallback and the breaker: for callers that retry
    /// rather than take a stand-in answer (the inbox, batch scoring jobs).
    public func submitPredictions(_ items: [JSONValue], deadline: ContinuousClock.Instant? = nil) async throws -> [ItemResult] {
        try await batcher.submit(items.map(Payload.json), deadline: deadline).map(Self.json)
    }

    /// Runs one Open Inference Protocol request: its input tensors, checked against the model's
    /// declared inputs before anything reaches Python, batched with other requests. The handler gets
    /// a dict of input name → numpy array and returns a dict of output name → array (or one array,
    /// named after the model's one declared output).
    ///
    /// Throws ``SidecarError`` (`invalidInput`) for a request that does not match, and
    /// ``PredictionError`` when the handler failed for it. With a `fallback:`, the fallback
    /// answers the failures it covers.
    public func infer(_ inputs: [Tensor], deadline: ContinuousClock.Instant? = nil) async throws -> [Tensor] {
        try await serveInference(inputs, deadline: deadline).value
    }

    /// ``infer(_:deadline:)``, saying whether the fallback answered (and why).
    public func serveInference(_ inputs: [Tensor], deadline: ContinuousClock.Instant? = nil) async throws -> Served<[Tensor]> {
        try validate(inputs)
        guard modelGuard.isActive else { return Served(value: try await submitInference(inputs, deadline: deadline), fallback: nil) }
        let fixed = modelGuard.fixedTensors
        return try await modelGuard.serve(
            deadline: deadline,
            primary: { try await self.submitInference(inputs, deadline: deadline) },
            alternative: { model in
                if let model {
                    // A request the fallback model cannot take gets the primary's error, not a 400.
                    guard (try? model.validate(inputs)) != nil else { return nil }
                    return try await model.submitInference(inputs, deadline: ModelGuard.fallbackDeadline(deadline))
                }
                return fixed
            })
    }

    /// ``infer(_:deadline:)`` without the fallback and the breaker (and without ``validate(_:)``,
    /// which the caller does): for the inbox, which retries instead.
    public func submitInference(_ inputs: [Tensor], deadline: ContinuousClock.Instant? = nil) async throws -> [Tensor] {
        let results = try await batcher.submit([.tensors(inputs)], deadline: deadline)
        guard case .tensors(var outputs) = try results[0].get() else {
            throw PredictionError(kind: .handlerError, type: "ProtocolError", message: "the worker answered a tensor request with JSON")
        }
        for index in outputs.indices where outputs[index].name.isEmpty {
            outputs[index].name = configuration.outputs.count == 1 ? configuration.outputs[0].name : "output0"
        }
        return outputs
    }

    /// Checks a request's tensors against themselves (data size matches shape) and against the
    /// declared inputs, if the model declares any.
    public func validate(_ inputs: [Tensor]) throws {
        var seen = Set<String>()
        for tensor in inputs {
            guard seen.insert(tensor.name).inserted else {
                throw SidecarError(.invalidInput, "input '\(tensor.name)' appears twice in the request")
            }
            try tensor.validate()
        }
        let declared = configuration.inputs
        guard !declared.isEmpty else { return }
        for tensor in inputs {
            guard let spec = declared.first(where: { $0.name == tensor.name }) else {
                throw SidecarError(
                    .invalidInput,
                    "model '\(name)' has no input '\(tensor.name)'; its inputs are \(declared.map(\.name).joined(separator: ", "))")
            }
            guard spec.datatype == tensor.datatype else {
                throw SidecarError(.invalidInput, "input '\(tensor.name)' must be \(spec.datatype.rawValue), got \(tensor.datatype.rawValue)")
            }
            guard spec.accepts(tensor.shape) else {
                throw SidecarError(.invalidInput, "input '\(tensor.name)' must have shape \(spec.shape) (-1: any size), got \(Tensor.describe(tensor.shape))")
            }
        }
        for spec in declared where !seen.contains(spec.name) {
            throw SidecarError(.invalidInput, "the request lacks input '\(spec.name)' (\(spec.datatype.rawValue) \(spec.shape)) that model '\(name)' declares")
        }
    }

    private static func json(_ result: PayloadResult) -> ItemResult {
        result.flatMap { payload in
            guard case .json(let value) = payload else {
                return .failure(PredictionError(kind: .handlerError, type: "ProtocolError", message: "the worker answered a JSON request with tensors"))
            }
            return .success(value)
        }
    }

    /// Items waiting for a worker.
    public var queuedItems: Int { batcher.queuedItems }

    /// How this model admits requests now: mode, limit, measured drain rate, refusals by reason.
    public var admission: AdmissionStatus { batcher.admission }

    /// Throws the error a request would get if nothing can be queued now (the model is closed,
    /// its queue is full, or at its adaptive limit): the fronts call this before they read a
    /// request's body, so an overload is refused before anything is decoded. Passing it does not
    /// reserve a place; `predict` and `infer` still decide with the items.
    public func refuseEarly() throws {
        if let error = modelGuard.earlyRefusal() { throw error }
        // Asked only when a refusal would reach the caller (asking counts a refusal).
        if modelGuard.covers(.queueFull), modelGuard.covers(.unavailable) { return }
        if let error = batcher.earlyRefusal() {
            // A refusal the fallback answers is not one: the request goes on to be answered by it.
            if let reason = FallbackReason.of(error), modelGuard.covers(reason) { return }
            throw error
        }
    }

    /// The circuit breaker's state (nil without `breaker:`).
    public var breaker: BreakerStatus? { modelGuard.breakerStatus }

    /// Batches dispatched to workers so far and the items they carried (retries count again).
    public var batchStatistics: BatchStatistics { batcher.statistics }

    /// One status per worker slot.
    public var workers: [WorkerStatus] { executor.workers }

    /// True once the model has started, until it stops or goes FAILED. A crashed worker being
    /// replaced does not make the model unready: its requests wait and are answered.
    public var isReady: Bool { executor.isAvailable }

    /// Changes the number of worker processes while the model serves. Returns once the new workers
    /// are ready or the leaving ones have finished their batches and exited; no request is dropped
    /// or failed. Throws after `timeout` (the change then completes in the background).
    ///
    /// On a model that autoscales, this turns autoscaling off: the operator's count wins until the
    /// model is reloaded.
    public func scale(to workers: Int, timeout: Duration = .seconds(120)) async throws {
        guard ModelConfiguration.workerRange.contains(workers) else {
            throw SidecarError(.invalidInput, "a model needs from \(ModelConfiguration.workerRange.lowerBound) to \(ModelConfiguration.workerRange.upperBound) workers, got \(workers)")
        }
        executor.disableAutoscaling(reason: "set to \(workers) worker(s) by hand")
        try await executor.resize(to: workers, timeout: timeout)
    }

    /// What the autoscaler is doing (nil when the model has a fixed worker count).
    public var autoscaler: AutoscalerStatus? { executor.autoscaler }

    /// Requests per second and p99 latency (submit to answer) over the last 10 seconds.
    public var recentTraffic: (requestsPerSecond: Double, p99: Duration?) {
        let snapshot = batcher.recentRequests.snapshot()
        return (snapshot.perSecond, snapshot.p99)
    }

    /// The model's state as operators see it.
    public enum State: Sendable, Equatable {
        /// Its workers are starting.
        case loading
        /// Serving (workers may be restarting: see ``workers``).
        case ready
        /// The crash-loop breaker tripped: requests are refused until the model is reloaded.
        case failed(SidecarError)

        public static func == (a: State, b: State) -> Bool {
            switch (a, b) {
            case (.loading, .loading), (.ready, .ready): return true
            case (.failed(let x), .failed(let y)): return x.message == y.message
            default: return false
            }
        }
    }

    public var state: State {
        if let failure = executor.failure { return .failed(failure) }
        return isReady ? .ready : .loading
    }
}
