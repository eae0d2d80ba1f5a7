import Synchronization

/// The batches one worker is running, at most `capacity` (2) at a time, so that the worker decodes
/// the next batch while it computes the current one, and no worker hoards the queue.
///
/// A batch that ``BatchJob/runsAlone`` (its items were on a worker that died) goes out only into an
/// empty window and keeps it to itself until answered: should the worker die again, that batch is
/// the only one it can have been running.
final class InFlightWindow: Sendable {
    let capacity: Int

    private struct State {
        var jobs: [UInt64: BatchJob] = [:]
        /// When each batch started running, as far as the supervisor can tell: a worker runs its
        /// batches one after the other, so the next one starts when the previous one is answered.
        var started: [UInt64: ContinuousClock.Instant] = [:]
        var roomWaiter: (continuation: CheckedContinuation<Void, Never>, alone: Bool)?
        /// A batch that runs alone is in flight.
        var holdsLoneBatch = false
        var closed = false

        func hasRoom(alone: Bool, capacity: Int) -> Bool {
            if closed { return true }
            return alone ? jobs.isEmpty : jobs.count < capacity && !holdsLoneBatch
        }
    }

    private let state = Mutex(State())

    init(capacity: Int) { self.capacity = capacity }

    var count: Int { state.withLock { $0.jobs.count } }

    /// When the longest-running batch started (for `batch_timeout_s`), or nil when idle.
    var oldestStart: ContinuousClock.Instant? { state.withLock { $0.started.values.min() } }

    /// Returns once there is room for another batch (`alone`: once the window is empty), the window
    /// is closed, or the task is cancelled: a worker that dies with a full window must not leave its
    /// dispatcher waiting (the session, and so the process's end, would wait for it forever).
    func waitForRoom(alone: Bool = false) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { state -> Bool in
                    if state.hasRoom(alone: alone, capacity: capacity) || Task.isCancelled { return true }
                    state.roomWaiter = (continuation, alone)
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            state.withLock { state in
                defer { state.roomWaiter = nil }
                return state.roomWaiter?.continuation
            }?.resume()
        }
    }

    /// Records a dispatched batch; false if the window was closed meanwhile (the worker is gone).
    func add(_ job: BatchJob) -> Bool {
        state.withLock { state in
            guard !state.closed else { return false }
            if job.runsAlone { state.holdsLoneBatch = true }
            state.jobs[job.id] = job
            state.started[job.id] = .now
            return true
        }
    }

    /// Removes an answered batch and wakes whoever waits for room or for an empty window.
    func remove(_ id: UInt64) -> BatchJob? {
        let (job, wake): (BatchJob?, [CheckedContinuation<Void, Never>]) = state.withLock { state in
            let job = state.jobs.removeValue(forKey: id)
            if job?.runsAlone == true { state.holdsLoneBatch = false }
            if state.started.removeValue(forKey: id) != nil {
                let now = ContinuousClock.now
                for key in state.started.keys { state.started[key] = now }
            }
            var wake: [CheckedContinuation<Void, Never>] = []
            if let waiter = state.roomWaiter, state.hasRoom(alone: waiter.alone, capacity: capacity) {
                wake.append(waiter.continuation)
                state.roomWaiter = nil
            }
            return (job, wake)
        }
        for waiter in wake { waiter.resume() }
        return job
    }

    /// Closes the window for good and returns the batches that never got an answer.
    func close() -> [BatchJob] {
        let (jobs, wake): ([BatchJob], [CheckedContinuation<Void, Never>]) = state.withLock { state in
            state.closed = true
            let jobs = state.jobs.values.sorted { $0.id < $1.id }
            state.jobs = [:]
            state.started = [:]
            var wake: [CheckedContinuation<Void, Never>] = []
            if let waiter = state.roomWaiter { wake.append(waiter.continuation) }
            state.roomWaiter = nil
            return (jobs, wake)
        }
        for waiter in wake { waiter.resume() }
        return jobs
    }
}
