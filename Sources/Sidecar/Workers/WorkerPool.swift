import Foundation
import Logging
import Metrics
import Synchronization

/// The supervisor of one model's Python worker processes.
///
/// The pool is a set of slots; each slot keeps one worker process alive and owns the whole policy
/// for it in one event loop (gunicorn's arbiter is the model): start a process; when it dies, hand
/// its unanswered batches back to the batcher (which splits them, so a poison item ends up alone)
/// and start a replacement after an exponential backoff with jitter; when it asks to be recycled,
/// start its successor first and retire it only once the successor is ready, so capacity does not
/// dip. Failures that are not a batch's doing feed the crash-loop breaker, which marks the model
/// FAILED instead of restarting forever.
final class WorkerPool: Executor {
    let spec: WorkerSpec
    let batcher: Batcher
    let logger: Logger
    let policy: ModelConfiguration.RestartPolicy

    /// What a slot's loop receives: an event for its ``SlotPolicy``, or a worker's exit with the
    /// facts the runner needs beside the policy's (the load error, stderr, for reports).
    enum SlotEvent: Sendable {
        case policy(SlotPolicy.Event)
        case exited(generation: Int, WorkerExit)
    }

    private struct State {
        var stopping = false
        /// Slots and the event sinks of their loops.
        var slots: [Int: AsyncStream<SlotEvent>.Continuation] = [:]
        /// Each slot's history (restarts, last error, what its past processes served) ...
        var statuses: [Int: LockedBox<WorkerStatus>] = [:]
        /// ... and the status of the process serving it now ...
        var live: [Int: LockedBox<WorkerStatus>] = [:]
        /// ... and of recycled processes still finishing their batches (they count until they exit).
        var draining: [Int: [LockedBox<WorkerStatus>]] = [:]
        var readySlots = Set<Int>()
        var initialSize: Int
        /// Failures that count toward the crash-loop breaker.
        var breaker: CrashLoopBreaker
        /// Set once the breaker tripped.
        var failure: SidecarError?
    }

    private let state: Mutex<State>
    private let readiness = Readiness()
    /// New slots for ``run()`` to start.
    private let newSlots: AsyncStream<Int>
    private let newSlotSink: AsyncStream<Int>.Continuation

    /// Set when the model autoscales.
    let autoscaling: ModelConfiguration.Autoscaling?
    let autoscalerStatus: LockedBox<AutoscalerStatus>?

    init(
        spec: WorkerSpec, size: Int, batcher: Batcher, policy: ModelConfiguration.RestartPolicy = .init(),
        autoscaling: ModelConfiguration.Autoscaling? = nil, logger: Logger
    ) {
        self.spec = spec
        self.batcher = batcher
        self.logger = logger
        self.policy = policy
        self.autoscaling = autoscaling
        self.autoscalerStatus = autoscaling.map { LockedBox(AutoscalerStatus(min: $0.min, max: $0.max)) }
        self.state = Mutex(State(initialSize: size, breaker: CrashLoopBreaker(policy)))
        (newSlots, newSlotSink) = AsyncStream.makeStream()
        for slot in 0..<size { addSlot(slot) }
    }

    var workers: [WorkerStatus] {
        // One snapshot under the pool's lock (boxes are only ever locked inside it, never the other
        // way round), so that counts moving from a draining worker into the history are seen once.
        let slots = state.withLock { state in
            state.statuses.sorted { $0.key < $1.key }.map { key, history in
                (history.withLock { $0 }, state.live[key]?.withLock { $0 }, (state.draining[key] ?? []).map { $0.withLock { $0 } })
            }
        }
        return slots.map { history, process, draining in
            var merged = history
            for leaving in draining { merged.addServed(by: leaving) }
            guard let process else { return merged }
            merged.state = process.state
            merged.pid = process.pid
            merged.inFlight = process.inFlight
            merged.rssBytes = process.rssBytes
            merged.pythonVersion = process.pythonVersion ?? merged.pythonVersion
            merged.batchesServed += process.batchesServed
            merged.itemsServed += process.itemsServed
            return merged
        }
    }

    /// Makes a recycled worker's successor the one a slot's status shows. The old worker still
    /// finishes its batches: its status keeps counting until it exits (``retired(_:in:history:)``).
    private func handOver(to worker: WorkerProcess, in slot: Int) {
        state.withLock { state in
            if let old = state.live[slot] { state.draining[slot, default: []].append(old) }
            state.live[slot] = worker.status
        }
    }

    /// A recycled worker finished draining and exited: what it served moves into the slot's history.
    private func retired(_ worker: WorkerProcess, in slot: Int, history: LockedBox<WorkerStatus>) {
        state.withLock { state in
            guard let index = state.draining[slot]?.firstIndex(where: { $0 === worker.status }) else { return }
            state.draining[slot]?.remove(at: index)
            let final = worker.status.withLock { $0 }
            history.withLock { $0.addServed(by: final) }
        }
    }

    /// Makes `worker` the one a slot's status shows; the served counts of the one it replaces (which
    /// has exited) move into the slot's history.
    private func show(_ worker: WorkerProcess?, in slot: Int, history: LockedBox<WorkerStatus>) {
        state.withLock { state in
            defer { state.live[slot] = worker?.status }
            guard let previous = state.live[slot]?.withLock({ $0 }) else { return }
            history.withLock {
                $0.addServed(by: previous)
                $0.pythonVersion = previous.pythonVersion ?? $0.pythonVersion
            }
        }
    }

    /// Set once the crash-loop breaker tripped: why the model is FAILED.
    var failure: SidecarError? { state.withLock { $0.failure } }

    /// Serving: started, not FAILED, not stopping. Workers being replaced do not make a model
    /// unavailable: its requests wait in the queue and are answered once a worker is back, so
    /// readiness does not flap (and a load balancer does not drop the instance) on every crash.
    var isAvailable: Bool {
        guard readiness.isReady else { return false }
        return state.withLock { $0.failure == nil && !$0.stopping }
    }

    func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.batcher.watchDeadlines() }
            if let autoscaling, let autoscalerStatus {
                let autoscaler = Autoscaler(bounds: autoscaling, pool: self, batcher: batcher, status: autoscalerStatus, logger: logger)
                group.addTask { await autoscaler.run() }
            }
            await withDiscardingTaskGroup { slots in
                for await slot in newSlots {
                    slots.addTask { await self.runSlot(slot) }
                }
            }
            group.cancelAll()
        }
        // Nothing will run what is still queued.
        batcher.fail(failure ?? SidecarError(.unavailable, "model '\(spec.model)' stopped"))
    }

    /// Returns once every initial worker is ready, or throws why the pool cannot serve. Cancelling
    /// the caller ends the wait with `CancellationError` (a load given up before the pool ran, or
    /// while it starts, must not hang).
    func waitUntilReady() async throws {
        try await readiness.wait()
    }

    func stop() {
        let sinks: [AsyncStream<SlotEvent>.Continuation] = state.withLock { state in
            state.stopping = true
            return Array(state.slots.values)
        }
        // Workers keep taking what is queued; once the queue is empty each finishes its in-flight
        // batches and exits, and the slots see `stopping` and do not restart them.
        batcher.close()
        for sink in sinks { sink.yield(.policy(.stop)) }
        resolveReadiness(.failure(SidecarError(.unavailable, "model '\(spec.model)' was stopped while starting")))
        finishSlotsIfEmpty()
    }

    private var isStopping: Bool { state.withLock { $0.stopping } }

    var autoscaler: AutoscalerStatus? { autoscalerStatus?.withLock { $0 } }

    func disableAutoscaling(reason: String) {
        autoscalerStatus?.withLock {
            guard $0.enabled else { return }
            $0.enabled = false
            $0.lastDecision = "off: \(reason)"
            $0.lastDecisionAt = Date()
        }
    }

    /// The number of worker slots now.
    var size: Int { state.withLock { $0.statuses.count } }

    /// Grows or shrinks the pool to `target` workers while it serves. Returns once the new workers
    /// are ready, or the leaving ones have drained (they take no new batch, finish those in flight
    /// up to `shutdown_grace_s`, then exit: nothing queued or running is lost); throws after
    /// `timeout`, or if the pool is stopping or failed.
    func resize(to target: Int, timeout: Duration) async throws {
        guard target >= 1 else { throw SidecarError(.invalidInput, "a model needs at least 1 worker, got \(target)") }
        let (added, leaving): ([Int], [(Int, AsyncStream<SlotEvent>.Continuation)]) = try state.withLock { state in
            if let failure = state.failure { throw failure }
            guard !state.stopping else { throw SidecarError(.unavailable, "model '\(spec.model)' is stopping") }
            let plan = ResizePlan(slots: Set(state.statuses.keys), target: target)
            for slot in plan.added { state.statuses[slot] = LockedBox(WorkerStatus(index: slot)) }
            return (plan.added, plan.retired.compactMap { slot in state.slots[slot].map { (slot, $0) } })
        }
        for slot in added { newSlotSink.yield(slot) }
        for (_, sink) in leaving { sink.yield(.policy(.retire)) }
        let deadline = ContinuousClock.now.advanced(by: timeout)
        let leavingSlots = Set(leaving.map(\.0))
        while true {
            let (done, failure): (Bool, SidecarError?) = state.withLock { state in
                if let failure = state.failure { return (true, failure) }
                // A stopping pool starts nothing more: waiting would only run out the timeout.
                if state.stopping { return (true, SidecarError(.unavailable, "model '\(spec.model)' stopped while scaling to \(target) workers")) }
                let ready = added.allSatisfy { slot in state.live[slot]?.withLock { $0.state.isServing } ?? false }
                let gone = leavingSlots.allSatisfy { state.statuses[$0] == nil }
                return (ready && gone, nil)
            }
            if let failure { throw failure }
            if done { return }
            guard ContinuousClock.now < deadline else {
                throw SidecarError(
                    .unavailable,
                    "model '\(spec.model)': scaling to \(target) workers did not finish within \(timeout); it goes on in the background (see GET /status)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    private func addSlot(_ slot: Int) {
        state.withLock { state in
            state.statuses[slot] = LockedBox(WorkerStatus(index: slot))
        }
        newSlotSink.yield(slot)
    }

    private func finishSlotsIfEmpty() {
        let done = state.withLock { $0.stopping && $0.slots.isEmpty }
        if done { newSlotSink.finish() }
    }

    private func resolveReadiness(_ outcome: Result<Void, SidecarError>) {
        readiness.resolve(outcome)
    }

    private func slotReady(_ slot: Int) {
        let allReady = state.withLock { state -> Bool in
            state.readySlots.insert(slot)
            return state.readySlots.count >= state.initialSize
        }
        if allReady { resolveReadiness(.success(())) }
    }

    // MARK: The crash-loop breaker

    /// Records a failure that is not a batch's doing; trips the breaker at `max_failures` within
    /// `window_s`.
    private func recordFailure(slot: Int, exit: WorkerExit) {
        let now = ContinuousClock.now
        let tripped: Bool = state.withLock { state in
            state.failure == nil && state.breaker.record(at: now)
        }
        guard tripped else { return }
        let last = exit.loadError.map { "the handler failed to load: \($0.type): \($0.message)" } ?? exit.reason
        let error = SidecarError(
            .unavailable,
            "model '\(spec.model)' is FAILED: workers failed \(policy.maxFailures) times within \(policy.window) (restart_policy); "
                + "last, worker \(slot): \(last). Fix the cause, then reload it (sidecar reload \(spec.model)).",
            detail: exit.loadError?.traceback ?? (exit.stderrTail.isEmpty ? nil : exit.stderrTail.joined(separator: "\n")))
        fail(error)
    }

    /// Marks the model FAILED: refuses new requests and fails queued ones with `error`, and retires
    /// every slot. The model stays listed (with the reason) until it is reloaded or unloaded.
    private func fail(_ error: SidecarError) {
        let sinks: [AsyncStream<SlotEvent>.Continuation] = state.withLock { state in
            state.failure = error
            state.stopping = true
            return Array(state.slots.values)
        }
        logger.critical("\(error.message)", metadata: error.detail.map { ["detail": "\($0)"] } ?? [:])
        batcher.fail(error)
        resolveReadiness(.failure(error))
        for sink in sinks { sink.yield(.policy(.retire)) }
        finishSlotsIfEmpty()
    }

    // MARK: One slot

    /// Runs one slot: its events go through the slot's ``SlotPolicy``, and this carries out the
    /// actions it returns (processes, status, the breaker, backoff timers).
    private func runSlot(_ slot: Int) async {
        let (events, sink) = AsyncStream.makeStream(of: SlotEvent.self)
        guard let status = state.withLock({ state -> LockedBox<WorkerStatus>? in
            state.slots[slot] = sink
            return state.statuses[slot]
        }) else { return }

        await withDiscardingTaskGroup { group in
            var slotPolicy = SlotPolicy(maxBackoff: policy.maxBackoff)
            var workers: [Int: WorkerProcess] = [:]
            /// The exit being handled, for the actions that report it.
            var lastExit: WorkerExit?

            func poolView() -> SlotPolicy.Pool {
                SlotPolicy.Pool(stopping: isStopping, awaitingFirstReadiness: readiness.outcome == nil)
            }

            /// Carries out the policy's actions; false once the slot is finished.
            func perform(_ actions: [SlotPolicy.Action]) -> Bool {
                for action in actions {
                    switch action {
                    case .start(let generation):
                        let worker = WorkerProcess(
                            spec: spec, index: slot, generation: generation, batcher: batcher, logger: logger,
                            onReady: { sink.yield(.policy(.ready(generation: generation))) },
                            onRecycle: { sink.yield(.policy(.recycle(generation: generation, reason: $0))) })
                        workers[generation] = worker
                        group.addTask { sink.yield(.exited(generation: generation, await worker.run())) }
                    case .show(let generation):
                        show(generation.flatMap { workers[$0] }, in: slot, history: status)
                    case .handOver(_, let successor):
                        if let worker = workers[successor] { handOver(to: worker, in: slot) }
                        status.withLock { $0.recycles += 1 }
                    case .retireWorker(let generation):
                        workers[generation]?.retire()
                    case .drained(let generation):
                        if let worker = workers[generation] { retired(worker, in: slot, history: status) }
                    case .slotReady:
                        slotReady(slot)
                    case .countRestart(let reason):
                        let message = "worker \(slot) \(reason)"
                        status.withLock {
                            $0.lastError = message
                            $0.restarts += 1
                            $0.state = .dead
                        }
                        Counter(label: "sidecar_worker_restarts_total", dimensions: [("model", spec.model)]).increment()
                    case .recordFailure:
                        if let lastExit { recordFailure(slot: slot, exit: lastExit) }
                    case .failFirstStart:
                        guard let exit = lastExit else { break }
                        let detail = exit.loadError?.traceback ?? exit.stderrTail.joined(separator: "\n")
                        let headline = exit.loadError.map { "\($0.type): \($0.message)" } ?? exit.reason
                        resolveReadiness(.failure(SidecarError(
                            .loadFailed, "model '\(spec.model)': worker \(slot) failed to start: \(headline)", detail: detail)))
                    case .scheduleRestart(let delay):
                        group.addTask {
                            try? await Task.sleep(for: delay)
                            sink.yield(.policy(.restart))
                        }
                    case .log(.recycling(let reason)):
                        logger.info("recycling worker \(slot): \(reason); starting its successor first")
                    case .log(.successorFailed(let reason)):
                        logger.warning("the successor of worker \(slot) failed to start (\(reason)); the current one keeps serving")
                    case .log(.died(let reason, let unanswered)):
                        let message = "worker \(slot) \(reason)"
                        switch unanswered {
                        case 0: logger.warning("\(message)")
                        case 1: logger.warning("\(message); the batch it was running is split and run again")
                        default: logger.warning("\(message); its \(unanswered) unanswered batches run again, each alone on a worker")
                        }
                    case .finish:
                        return false
                    }
                }
                return true
            }

            var running = perform(slotPolicy.handle(.begin, pool: poolView()))
            var pending = events.makeAsyncIterator()
            while running, let event = await pending.next() {
                switch event {
                case .policy(let event):
                    running = perform(slotPolicy.handle(event, pool: poolView()))
                case .exited(let generation, let exit):
                    guard let worker = workers[generation] else { break }
                    // Nothing is lost: what the worker had not answered goes back to the batcher, which
                    // blames only a batch that is known to have been running (see workerDied(unanswered:)).
                    let unanswered = worker.window.close()
                    batcher.workerDied(unanswered: unanswered, reason: "worker \(slot) \(exit.reason)")
                    lastExit = exit
                    let facts = SlotPolicy.Exit(exit, unanswered: unanswered.count)
                    running = perform(slotPolicy.handle(.exited(generation: generation, facts), pool: poolView()))
                    workers.removeValue(forKey: generation)
                    lastExit = nil
                }
            }
            // Pending backoff sleeps end with the slot.
            group.cancelAll()
        }
        show(nil, in: slot, history: status)
        status.withLock { $0.state = .stopped }
        state.withLock { state in
            state.slots[slot] = nil
            // A slot removed by scale-down leaves the status list; after a stop or a failure the
            // stopped slots stay visible.
            if !state.stopping { state.statuses[slot] = nil }
        }
        finishSlotsIfEmpty()
    }
}
