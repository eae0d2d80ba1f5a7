import CPython
import Foundation
import Logging
import Metrics
import SidecarWorkerProtocol
import SwiftProtobuf
import Synchronization

/// Runs a model's handler inside the server process (`executor: embedded`), behind the same batcher
/// as a worker pool.
///
/// One dedicated OS thread per model owns its Python thread state and runs one batch at a time: it
/// takes the GIL for the batch and releases it between batches. A batch crosses to that thread as
/// the worker protocol's serialized `Batch` and comes back as a serialized `BatchResult`, so the
/// Python side is the worker runtime's own batch code (`sidecar_worker.embedded`) and the result
/// is settled exactly as a worker's (``BatchResultDecoder/settle(_:with:batcher:logger:)``).
///
/// Nothing can be killed here, so health is different from a pool's: a batch past
/// `batch_timeout_s` gets `BatchTimeout` (a `TimeoutError`) raised in its thread; one that still
/// has not returned `ping_timeout_s` later (stuck in C code), or a GIL that no thread could take for
/// `ping_timeout_s` while a batch ran, marks the model FAILED — its requests are refused at once,
/// other models are untouched. A segfault takes the server down; the ``CrashRecord`` written
/// around every batch lets the next start name the batch and run the model in process mode.
final class EmbeddedExecutor: Executor {
    let spec: WorkerSpec
    let environment: PythonEnvironment
    let batcher: Batcher
    let logger: Logger
    let interpreter: EmbeddedInterpreter
    let record: CrashRecord?
    let faultLog: URL

    /// The Python objects of the loaded handler: touched only on ``thread`` with the GIL held.
    private final class Loaded: @unchecked Sendable {
        let threadState: EmbeddedInterpreter.ThreadState
        let runner: PythonObject
        let run: PythonObject
        let drainLogs: PythonObject

        init(threadState: EmbeddedInterpreter.ThreadState, runner: PythonObject, run: PythonObject, drainLogs: PythonObject) {
            self.threadState = threadState
            self.runner = runner
            self.run = run
            self.drainLogs = drainLogs
        }
    }

    /// How one batch came back from the thread.
    private struct Outcome: Sendable {
        enum Value: Sendable {
            case result([UInt8])
            /// Python raised out of the runtime (the interrupt landing outside the handler, a runtime bug).
            case raised(PythonCalls.Failure)
        }
        var value: Value
        var logs: [[UInt8]]
        /// The watch raised `BatchTimeout` into it.
        var interrupted: Bool
    }

    private struct Running {
        let id: UInt64
        let count: Int
        let started: ContinuousClock.Instant
        var interruptedAt: ContinuousClock.Instant?
    }

    private struct State {
        var stopping = false
        var failure: SidecarError?
        var loaded: Loaded?
        var running: Running?
        /// The batch whose Python call is in progress, set and cleared by the thread with the GIL
        /// held: what an interrupt checks (under the GIL) before it raises.
        var inPython: UInt64?
        /// End the waits for the jobs queued on or running on the thread: ``fail(_:)`` calls them,
        /// so that a stuck thread does not hold up the model's end.
        var abandon: [UInt64: @Sendable () -> Void] = [:]
        var nextCall: UInt64 = 0
    }

    /// Batches handed to the thread at once: the one it runs and the one queued behind it.
    static let pipeline = 2

    private let state = Mutex(State())
    private let readiness = Readiness()
    private let thread: DedicatedThread
    private let status: LockedBox<WorkerStatus>
    private let computeTime: Metrics.Timer

    init(
        spec: WorkerSpec, environment: PythonEnvironment, batcher: Batcher, record: CrashRecord?, faultLog: URL, logger: Logger,
        interpreter: EmbeddedInterpreter = .shared
    ) {
        self.spec = spec
        self.environment = environment
        self.batcher = batcher
        self.record = record
        self.faultLog = faultLog
        self.logger = logger
        self.interpreter = interpreter
        self.thread = DedicatedThread(name: "sidecar-embedded-\(spec.model)".prefix(15).description, spin: DedicatedThread.pythonSpin)
        var status = WorkerStatus(index: 0)
        status.pid = getpid()
        self.status = LockedBox(status)
        self.computeTime = Metrics.Timer(label: "sidecar_compute_seconds", dimensions: [("model", spec.model)])
    }

    // MARK: Executor

    var workers: [WorkerStatus] {
        var snapshot = status.withLock { $0 }
        snapshot.rssBytes = ProcessMemory.residentBytes(of: getpid())
        snapshot.pythonVersion = interpreter.version
        return [snapshot]
    }

    var autoscaler: AutoscalerStatus? { nil }

    var note: String? {
        let others = interpreter.models.filter { $0 != spec.model }
        guard !others.isEmpty else { return "embedded: the handler runs in the server's Python interpreter, in a thread of its own" }
        return "embedded: shares the server's Python interpreter, and its GIL, with \(others.map { "'\($0)'" }.joined(separator: ", ")): their batches take turns"
    }

    func disableAutoscaling(reason: String) {}

    var failure: SidecarError? { state.withLock { $0.failure } }

    var isAvailable: Bool {
        guard readiness.isReady else { return false }
        return state.withLock { $0.failure == nil && !$0.stopping }
    }

    func waitUntilReady() async throws { try await readiness.wait() }

    func resize(to workers: Int, timeout: Duration) async throws {
        guard workers == 1 else {
            throw SidecarError(
                .invalidInput,
                "model '\(spec.model)' runs embedded, in one thread of the server: it cannot have \(workers) workers; set executor: process in its sidecar.yaml and reload it to scale")
        }
    }

    func stop() {
        state.withLock { $0.stopping = true }
        // The thread takes what is queued; once the queue is empty the run loop ends.
        batcher.close()
        readiness.resolve(.failure(SidecarError(.unavailable, "model '\(spec.model)' was stopped while starting")))
    }

    func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.batcher.watchDeadlines() }
            group.addTask { await self.watch() }
            await serve()
            group.cancelAll()
        }
        batcher.fail(failure ?? SidecarError(.unavailable, "model '\(spec.model)' stopped"))
        status.withLock {
            $0.state = .stopped
            $0.inFlight = 0
        }
        interpreter.dismiss(model: spec.model)
    }

    // MARK: Serving

    private func serve() async {
        let started = ContinuousClock.now
        do {
            try await interpreter.start(environment: environment, model: spec.model, faultLog: faultLog)
        } catch {
            let failure = error as? SidecarError ?? SidecarError(.environmentFailed, "\(error)")
            readiness.resolve(.failure(failure))
            thread.finish()
            return
        }
        record?.loading()
        let loaded = await onThread { self.loadOnThread() }
        record?.clear()
        guard let loaded else { return }  // failed meanwhile (startup_s passed): the load is abandoned
        switch loaded {
        case .failure(let error):
            readiness.resolve(.failure(error))
            thread.finish()
            return
        case .success(let logs):
            forward(logs)
        }
        status.withLock { $0.state = .ready }
        logger.info(
            "embedded handler ready",
            metadata: ["load_seconds": "\(String(format: "%.2f", (ContinuousClock.now - started).inSeconds))", "python": "\(interpreter.version ?? "?")"])
        readiness.resolve(.success(()))

        // Two lanes: while the thread runs one batch the next is taken, encoded and queued behind
        // it, so the thread goes from batch to batch without waiting for Swift in between.
        await withDiscardingTaskGroup { lanes in
            for _ in 0..<Self.pipeline {
                lanes.addTask {
                    while let job = await self.batcher.nextBatch() {
                        guard await self.runBatch(job) else { break }
                    }
                }
            }
        }
        // A stuck thread never comes back: leave it (and its thread state) alone.
        guard state.withLock({ $0.failure == nil }) else { return }
        status.withLock { $0.state = .draining }
        await thread.run(ifFinished: ()) { self.closeOnThread() }
        thread.finish()
    }

    /// Runs one batch on the thread and answers it; false once the model failed.
    private func runBatch(_ job: BatchJob) async -> Bool {
        let bytes: [UInt8]
        do {
            bytes = try BatchEncoder.message(for: job, isolate: batcher.retry).serializedBytes()
        } catch {
            job.fail(PredictionError(kind: .handlerError, type: "ProtocolError", message: "the batch could not be encoded: \(error)"))
            return true
        }
        status.withLock {
            $0.state = .busy
            $0.inFlight += 1
        }
        let outcome = await onThread { self.runOnThread(bytes, id: job.id, count: job.count) }
        status.withLock {
            $0.inFlight -= 1
            if $0.inFlight == 0, $0.state == .busy { $0.state = .ready }
        }
        guard let outcome else {
            // The model failed while the batch ran (it is stuck): the thread is left to itself.
            let message = failure?.message ?? "model '\(spec.model)' stopped"
            job.fail(PredictionError(kind: .unavailable, type: "Unavailable", message: message))
            return false
        }
        forward(outcome.logs)
        let interrupted = outcome.interrupted
        switch outcome.value {
        case .raised(let failure):
            if interrupted {
                job.fail(timeoutError(job))
            } else {
                job.fail(PredictionError(
                    kind: .handlerError, type: "InternalError", message: "the embedded runtime failed: \(failure.headline)",
                    traceback: failure.traceback.isEmpty ? nil : failure.traceback))
            }
        case .result(let bytes):
            guard let result = try? Sidecar_Worker_V1_BatchResult(serializedBytes: bytes) else {
                job.fail(PredictionError(kind: .handlerError, type: "ProtocolError", message: "the embedded runtime answered with a malformed result"))
                break
            }
            status.withLock {
                $0.batchesServed += 1
                $0.itemsServed += job.count
            }
            computeTime.recordNanoseconds(Int64(result.computeSeconds * 1e9))
            if interrupted {
                // Not bisected: every half would run into the same timeout again.
                job.fail(timeoutError(job))
            } else {
                BatchResultDecoder.settle(job, with: result, batcher: batcher, logger: logger)
            }
        }
        return true
    }

    private func timeoutError(_ job: BatchJob) -> PredictionError {
        PredictionError(
            kind: .handlerError, type: "TimeoutError",
            message: "the batch of \(job.count) item(s) ran past batch_timeout_s (\(spec.timeouts.batch)) and was interrupted")
    }

    /// Runs `body` on the model's thread; nil when the model failed before it returned (the thread
    /// is stuck and its result, should it ever come, is dropped) or the thread takes no more jobs.
    private func onThread<T: Sendable>(_ body: @escaping () -> T) async -> T? {
        let once = ResumeOnce<T?>()
        let callID = Mutex<UInt64?>(nil)
        let value = await withCheckedContinuation { (continuation: CheckedContinuation<T?, Never>) in
            once.set(continuation)
            let call = state.withLock { state -> UInt64? in
                guard state.failure == nil else { return nil }
                state.nextCall += 1
                state.abandon[state.nextCall] = { once.resume(nil) }
                return state.nextCall
            }
            if call == nil || !thread.submit({ once.resume(body()) }) { once.resume(nil) }
            callID.withLock { $0 = call }
        }
        if let call = callID.withLock({ $0 }) { state.withLock { _ = $0.abandon.removeValue(forKey: call) } }
        return value
    }

    private func forward(_ logs: [[UInt8]]) {
        for bytes in logs {
            guard let record = try? Sidecar_Worker_V1_LogRecord(serializedBytes: bytes) else { continue }
            logger.log(level: WorkerProcess.level(record.level), "\(record.message)", metadata: ["logger": "\(record.logger)"])
        }
    }

    // MARK: On the thread (the GIL taken here and released before each job ends)

    /// Loads the handler; the log records its loading wrote come back with the outcome.
    private func loadOnThread() -> Result<[[UInt8]], SidecarError> {
        guard let threadState = interpreter.makeThreadState(), let runtime = interpreter.runtime else {
            return .failure(SidecarError(.loadFailed, "model '\(spec.model)': the embedded interpreter is not running"))
        }
        PyEval_RestoreThread(threadState.state)
        let loaded = load(runtime: runtime, threadState: threadState)
        let logs = (try? loaded.get()).map(drainLogs) ?? []
        _ = PyEval_SaveThread()
        switch loaded {
        case .success(let loaded):
            state.withLock { $0.loaded = loaded }
            return .success(logs)
        case .failure(let error):
            interpreter.releaseThreadState(threadState)
            return .failure(error)
        }
    }

    /// `sidecar_worker.embedded.load(...)`, with the GIL held.
    private func load(runtime: PythonObject, threadState: EmbeddedInterpreter.ThreadState) -> Result<Loaded, SidecarError> {
        let arguments = [
            PythonCalls.string(spec.modelDirectory.path), PythonCalls.string(spec.handler), PythonCalls.string(spec.model),
            PythonCalls.string(spec.handlerConfig.json),
        ]
        let called = PythonCalls.attribute(runtime, "load").flatMap { load in
            defer { PythonCalls.release(load) }
            return PythonCalls.call(load, arguments)
        }
        let pair: PythonObject
        switch called {
        case .success(let value): pair = value
        case .failure(let failure):
            return .failure(SidecarError(.loadFailed, "model '\(spec.model)': the embedded runtime failed to load the handler: \(failure.headline)", detail: failure.traceback))
        }
        defer { PythonCalls.release(pair) }
        guard case .success(let parts) = PythonCalls.items(pair), parts.count == 2 else {
            return .failure(SidecarError(.loadFailed, "model '\(spec.model)': the embedded runtime's load returned something unexpected"))
        }
        defer { PythonCalls.release(parts[1]) }
        if case .success(let bytes) = PythonCalls.bytes(parts[1]), !bytes.isEmpty {
            PythonCalls.release(parts[0])
            let failed = (try? Sidecar_Worker_V1_LoadFailed(serializedBytes: bytes))?.error ?? .init()
            return .failure(SidecarError(
                .loadFailed, "model '\(spec.model)': the handler failed to load: \(failed.type): \(failed.message)",
                detail: failed.traceback.isEmpty ? nil : failed.traceback))
        }
        let runner = parts[0]
        guard case .success(let run) = PythonCalls.attribute(runner, "run"), case .success(let drain) = PythonCalls.attribute(runner, "drain_logs") else {
            PythonCalls.release(runner)
            return .failure(SidecarError(.loadFailed, "model '\(spec.model)': the embedded runner lacks run/drain_logs"))
        }
        return .success(Loaded(threadState: threadState, runner: runner, run: run, drainLogs: drain))
    }

    private func runOnThread(_ bytes: [UInt8], id: UInt64, count: Int) -> Outcome {
        // A batch queued behind one that got stuck: its caller was answered when the model failed,
        // so it must not run (with `retry: false` it would run a second time, answered or not).
        guard let loaded = state.withLock({ $0.failure == nil ? $0.loaded : nil }) else {
            let failure = PythonCalls.Failure(type: "RuntimeError", message: "model '\(spec.model)' is not loaded", traceback: "")
            return Outcome(value: .raised(failure), logs: [], interrupted: false)
        }
        record?.running(batch: id, items: count)
        PyEval_RestoreThread(loaded.threadState.state)
        // Set and cleared with the GIL held: what an interrupt checks before it raises.
        state.withLock {
            $0.running = Running(id: id, count: count, started: .now)
            $0.inPython = id
        }
        let called = PythonCalls.call(loaded.run, bytes: bytes)
        let interrupted = state.withLock { state -> Bool in
            defer {
                state.inPython = nil
                state.running = nil
            }
            return state.running?.interruptedAt != nil
        }
        // An interrupt raised just as the batch returned must not land in the next one.
        _ = PyThreadState_SetAsyncExc(loaded.threadState.ident, nil)
        let logs = drainLogs(loaded)
        let value: Outcome.Value
        switch called {
        case .success(let result):
            let data = PythonCalls.bytes(result)
            PythonCalls.release(result)
            switch data {
            case .success(let bytes): value = .result(bytes)
            case .failure(let failure): value = .raised(failure)
            }
        case .failure(let failure):
            value = .raised(failure)
        }
        _ = PyEval_SaveThread()
        record?.idle()
        return Outcome(value: value, logs: logs, interrupted: interrupted)
    }

    /// The handler's log records since the last batch (usually none: one call, no allocation).
    private func drainLogs(_ loaded: Loaded) -> [[UInt8]] {
        guard case .success(let records) = PythonCalls.call(loaded.drainLogs, []) else { return [] }
        defer { PythonCalls.release(records) }
        guard PySequence_Size(records.pointer) > 0, case .success(let items) = PythonCalls.items(records) else {
            PyErr_Clear()
            return []
        }
        defer { items.forEach(PythonCalls.release) }
        return items.compactMap { try? PythonCalls.bytes($0).get() }
    }

    private func closeOnThread() {
        guard let loaded = state.withLock({ $0.loaded }) else { return }
        PyEval_RestoreThread(loaded.threadState.state)
        if case .success(let close) = PythonCalls.attribute(loaded.runner, "close") {
            if case .success(let none) = PythonCalls.call(close, []) { PythonCalls.release(none) }
            PythonCalls.release(close)
        }
        [loaded.run, loaded.drainLogs, loaded.runner].forEach(PythonCalls.release)
        _ = PyEval_SaveThread()
        interpreter.releaseThreadState(loaded.threadState)
        state.withLock { $0.loaded = nil }
    }

    // MARK: Health

    /// Every `ping_interval_s` (at most a second): the startup deadline, the batch timeout (raise,
    /// then FAILED), the GIL's liveness while a batch runs.
    private func watch() async {
        let timeouts = spec.timeouts
        let startupDeadline = ContinuousClock.now.advanced(by: timeouts.startup)
        let tick = min(timeouts.pingInterval, .seconds(1))
        while !Task.isCancelled {
            try? await Task.sleep(for: tick)
            if Task.isCancelled { return }
            let now = ContinuousClock.now
            if readiness.outcome == nil {
                if now > startupDeadline {
                    fail(SidecarError(.loadFailed, "model '\(spec.model)': the embedded handler did not load within startup_s (\(timeouts.startup))"))
                    return
                }
                continue
            }
            interpreter.ping()
            let (running, ident) = state.withLock { ($0.running, $0.loaded?.threadState.ident) }
            guard let running else { continue }
            let (_, waiting) = interpreter.liveness
            if let waiting, now - waiting > timeouts.pingTimeout {
                fail(SidecarError(
                    .unavailable,
                    "model '\(spec.model)' is FAILED: no thread could take the GIL for \(timeouts.pingTimeout) (ping_timeout_s) while its batch \(running.id) (\(running.count) item(s)) ran for \(now - running.started): the handler holds the GIL in native code. "
                        + "The server's other models keep serving; embedded models cannot until it returns. Restart the server, or run the model with executor: process (a hung worker process is killed and replaced)."))
                return
            }
            if let interruptedAt = running.interruptedAt {
                if now - interruptedAt > timeouts.pingTimeout {
                    fail(SidecarError(
                        .unavailable,
                        "model '\(spec.model)' is FAILED: its batch \(running.id) (\(running.count) item(s)) ran past batch_timeout_s (\(timeouts.batch)) and did not stop within ping_timeout_s (\(timeouts.pingTimeout)) of being interrupted: the handler is stuck in native code. "
                            + "Fix the handler, then reload it (sidecar reload \(spec.model)), or run it with executor: process (a stuck worker process is killed and replaced)."))
                    return
                }
            } else if now - running.started > timeouts.batch, let ident {
                let interrupting = state.withLock { state -> Bool in
                    guard state.running?.id == running.id else { return false }
                    state.running?.interruptedAt = now
                    return true
                }
                guard interrupting else { continue }
                logger.warning("batch \(running.id) (\(running.count) item(s)) ran past batch_timeout_s (\(timeouts.batch)); raising TimeoutError in the handler")
                let id = running.id
                interpreter.interrupt(ident: ident) { [weak self] in self?.state.withLock { $0.inPython == id } ?? false }
            }
        }
    }

    /// Marks the model FAILED: refuses new requests and fails queued ones with `error`; the batch in
    /// progress (if any) is answered with it and its thread left to itself.
    private func fail(_ error: SidecarError) {
        let abandon = state.withLock { state -> [@Sendable () -> Void] in
            guard state.failure == nil else { return [] }
            state.failure = error
            state.stopping = true
            defer { state.abandon = [:] }
            return Array(state.abandon.values)
        }
        // The record is for crashes: a model failed here is known, and the server did not die of it.
        record?.clear()
        logger.critical("\(error.message)")
        status.withLock {
            $0.state = .hung
            $0.lastError = error.message
        }
        batcher.fail(error)
        readiness.resolve(.failure(error))
        for end in abandon { end() }
    }
}

/// A continuation resumed by whichever comes first (the thread's answer or the model's failure);
/// later resumes are ignored.
private final class ResumeOnce<T: Sendable>: Sendable {
    private let continuation = Mutex<CheckedContinuation<T, Never>?>(nil)

    func set(_ continuation: CheckedContinuation<T, Never>) {
        self.continuation.withLock { $0 = continuation }
    }

    func resume(_ value: T) {
        let waiting = continuation.withLock { state -> CheckedContinuation<T, Never>? in
            defer { state = nil }
            return state
        }
        waiting?.resume(returning: value)
    }
}
