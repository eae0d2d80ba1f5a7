import Foundation
import Logging
import Metrics
import Synchronization

/// The supervisor of one model's Python worker processes.
///
/// Each slot runs a loop, the whole policy in one place (gunicorn's arbiter is the model): start a
/// process, wait for it to end, hand its unanswered batches back to the batcher so another worker
/// runs them, then start a replacement after a backoff — unless the pool is stopping.
final class WorkerPool: Executor {
    let spec: WorkerSpec
    let size: Int
    let batcher: Batcher
    let logger: Logger

    private struct State {
        var stopping = false
        var readySlots = Set<Int>()
        var readiness: Result<Void, SidecarError>?
        var readyWaiters: [CheckedContinuation<Void, any Error>] = []
    }

    private let state = Mutex(State())
    private let statuses: [LockedBox<WorkerStatus>]

    init(spec: WorkerSpec, size: Int, batcher: Batcher, logger: Logger) {
        self.spec = spec
        self.size = size
        self.batcher = batcher
        self.logger = logger
        self.statuses = (0..<size).map { LockedBox(WorkerStatus(index: $0)) }
    }

    var workers: [WorkerStatus] { statuses.map { $0.withLock { $0 } } }

    func run() async {
        await withDiscardingTaskGroup { group in
            for slot in 0..<size {
                group.addTask { await self.runSlot(slot) }
            }
        }
        // Nothing will run what is still queued.
        batcher.fail(SidecarError(.unavailable, "model '\(spec.model)' stopped"))
    }

    func waitUntilReady() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let outcome: Result<Void, SidecarError>? = state.withLock { state in
                if let readiness = state.readiness { return readiness }
                state.readyWaiters.append(continuation)
                return nil
            }
            if let outcome { continuation.resume(with: outcome) }
        }
    }

    func stop() {
        state.withLock { $0.stopping = true }
        // Workers keep taking what is queued; once the queue is empty each finishes its in-flight
        // batches and exits, and the slot loops see `stopping` and do not restart them.
        batcher.close()
        resolveReadiness(.failure(SidecarError(.unavailable, "model '\(spec.model)' was stopped while starting")))
    }

    /// Stopping, or cancelled: a cancelled task cannot sleep through a backoff, so without the
    /// cancellation check the slot loop would restart workers in a tight loop.
    private var isStopping: Bool { state.withLock { $0.stopping } || Task.isCancelled }

    private func resolveReadiness(_ outcome: Result<Void, SidecarError>) {
        let waiters: [CheckedContinuation<Void, any Error>] = state.withLock { state in
            guard state.readiness == nil else { return [] }
            state.readiness = outcome
            defer { state.readyWaiters = [] }
            return state.readyWaiters
        }
        for waiter in waiters { waiter.resume(with: outcome.mapError { $0 as any Error }) }
    }

    private func slotReady(_ slot: Int) {
        let allReady = state.withLock { state -> Bool in
            state.readySlots.insert(slot)
            return state.readySlots.count == size
        }
        if allReady { resolveReadiness(.success(())) }
    }

    private func runSlot(_ slot: Int) async {
        var generation = 0
        var failuresInARow = 0
        let status = statuses[slot]
        while !isStopping {
            let worker = WorkerProcess(
                spec: spec, index: slot, generation: generation, batcher: batcher, status: status, logger: logger,
                onReady: { [weak self] in self?.slotReady(slot) })
            let exit = await worker.run()

            // Nothing is lost: what the dead worker was running goes back to the head of the queue.
            let unanswered = worker.window.close()
            for job in unanswered {
                batcher.requeue(job, reason: "worker \(slot) ended while running the item (\(exit.reason))")
            }
            if isStopping { break }

            let message = "worker \(slot) \(exit.reason)"
            status.withLock { $0.lastError = message; $0.restarts += 1 }
            Counter(label: "sidecar_worker_restarts_total", dimensions: [("model", spec.model)]).increment()
            if !unanswered.isEmpty {
                logger.warning("\(message); \(unanswered.count) batch(es) it was running go back to the queue")
            } else {
                logger.warning("\(message)")
            }

            let initial = state.withLock { $0.readiness == nil }
            if initial, !exit.becameReady {
                // The first start failed: report it rather than retrying a handler that cannot load.
                let detail = exit.loadError?.traceback ?? exit.stderrTail.joined(separator: "\n")
                let headline = exit.loadError.map { "\($0.type): \($0.message)" } ?? exit.reason
                resolveReadiness(.failure(SidecarError(.loadFailed, "model '\(spec.model)': worker \(slot) failed to start: \(headline)", detail: detail)))
                break
            }
            failuresInARow = exit.becameReady ? 0 : failuresInARow + 1
            generation += 1
            // Exponential backoff with jitter, so a crash loop does not spin and replacements of
            // several workers do not start in lockstep.
            let base = min(30.0, 0.1 * pow(2.0, Double(failuresInARow)))
            let delay = base * Double.random(in: 0.5...1.0)
            let wakeAt = ContinuousClock.now.advanced(by: .milliseconds(Int(delay * 1000)))
            while !isStopping, ContinuousClock.now < wakeAt {
                try? await Task.sleep(for: .milliseconds(50))
            }
        }
        status.withLock { $0.state = .stopped }
    }
}
