import HeapModule
import Synchronization

/// The deadlines of one model's queued requests: one heap and one watching task, rather than a
/// timer per request. The heap holds requests weakly, so a request answered long before its
/// deadline is not kept alive until then. ``Batcher`` inserts every request that has a deadline and
/// answers the ones this hands back.
final class DeadlineWatch: Sendable {
    private struct Entry: Comparable {
        let deadline: ContinuousClock.Instant
        weak var request: PendingRequest?

        static func < (a: Self, b: Self) -> Bool { a.deadline < b.deadline }
        static func == (a: Self, b: Self) -> Bool { a.deadline == b.deadline }
    }

    private struct State {
        var heap = Heap<Entry>()
        /// The watch, asleep because the heap was empty.
        var sleeper: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())

    func insert(_ request: PendingRequest) {
        guard let deadline = request.deadline else { return }
        let sleeper = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.heap.insert(Entry(deadline: deadline, request: request))
            defer { state.sleeper = nil }
            return state.sleeper
        }
        sleeper?.resume()
    }

    /// Until the calling task is cancelled: whenever deadlines pass, hands the requests still
    /// unanswered to `expired`.
    func run(_ expired: ([PendingRequest]) -> Void) async {
        while !Task.isCancelled {
            let next: ContinuousClock.Instant? = state.withLock { $0.heap.min?.deadline }
            if let next {
                // Wake at the earliest deadline, and at least every 10 ms: a later insert may be earlier.
                let wake = min(next, ContinuousClock.now.advanced(by: .milliseconds(10)))
                try? await Task.sleep(until: wake, clock: .continuous)
            } else {
                await sleepUntilInserted()
            }
            let due = takeDue(now: .now)
            if !due.isEmpty { expired(due) }
        }
    }

    private func takeDue(now: ContinuousClock.Instant) -> [PendingRequest] {
        state.withLock { state in
            var due: [PendingRequest] = []
            while let first = state.heap.min, first.deadline <= now {
                let entry = state.heap.removeMin()
                if let request = entry.request, !request.isFinished { due.append(request) }
            }
            return due
        }
    }

    private func sleepUntilInserted() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    if !state.heap.isEmpty || Task.isCancelled { return true }
                    state.sleeper = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            state.withLock { state in
                defer { state.sleeper = nil }
                return state.sleeper
            }?.resume()
        }
    }
}
