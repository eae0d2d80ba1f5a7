import Foundation
import Synchronization

/// The outcome of one item: its prediction, or the reason it has none.
public typealias ItemResult = Result<JSONValue, PredictionError>

/// One caller's items and the continuation that gets their results.
///
/// A request larger than `max_batch_size` is spread over several batches (possibly on several
/// workers); it resumes its caller once every item has a result. Once it is finished (answered,
/// failed or cancelled) late results are ignored, so a batch that comes back after its caller gave
/// up harms nobody.
final class PendingRequest: Sendable {
    let items: [Payload]
    let enqueuedAt: ContinuousClock.Instant
    /// When the caller stops waiting: past it the request is answered `deadlineExceeded` and its
    /// items still queued are never dispatched.
    let deadline: ContinuousClock.Instant?

    private struct State {
        var results: [PayloadResult]
        var remaining: Int
        var continuation: CheckedContinuation<[PayloadResult], any Error>?
        var finished = false
    }

    private let state: Mutex<State>

    private static let placeholder = PayloadResult.failure(
        PredictionError(kind: .unavailable, type: "Unanswered", message: "no result"))

    init(items: [Payload], deadline: ContinuousClock.Instant? = nil) {
        self.items = items
        self.enqueuedAt = .now
        self.deadline = deadline
        // Results are allocated only when a request arrives in parts (see `fill`).
        self.state = Mutex(State(results: [], remaining: items.count))
    }

    var isFinished: Bool { state.withLock { $0.finished } }

    /// Stores the continuation, unless the request was cancelled before it got here.
    func attach(_ continuation: CheckedContinuation<[PayloadResult], any Error>) -> Bool {
        state.withLock { state in
            if state.finished { return false }
            state.continuation = continuation
            return true
        }
    }

    /// Resumes the caller with every result at once: the common case of a request that travelled in
    /// one batch, which needs no per-item copy.
    func complete(with results: [PayloadResult]) {
        let continuation: CheckedContinuation<[PayloadResult], any Error>? = state.withLock { state in
            guard !state.finished, state.remaining == items.count else { return nil }
            state.finished = true
            state.remaining = 0
            defer { state.continuation = nil }
            return state.continuation
        }
        continuation?.resume(returning: results)
    }

    /// Records the results of `range`; resumes the caller when it was the last missing part.
    func fill(_ range: Range<Int>, with results: ArraySlice<PayloadResult>) {
        let done: (CheckedContinuation<[PayloadResult], any Error>, [PayloadResult])? = state.withLock { state in
            guard !state.finished else { return nil }
            if state.results.isEmpty { state.results = Array(repeating: Self.placeholder, count: items.count) }
            var index = range.lowerBound
            for result in results {
                state.results[index] = result
                index += 1
            }
            state.remaining -= range.count
            guard state.remaining == 0, let continuation = state.continuation else { return nil }
            state.finished = true
            state.continuation = nil
            return (continuation, state.results)
        }
        if let (continuation, results) = done { continuation.resume(returning: results) }
    }

    /// Fails `range` with `error`, item by item (other parts of the request may still succeed).
    func fail(_ range: Range<Int>, with error: PredictionError) {
        fill(range, with: ArraySlice(repeating: .failure(error), count: range.count))
    }

    /// Ends the request at once with `error` (cancellation, shutdown). Returns false if it had already
    /// finished.
    @discardableResult
    func abort(with error: any Error) -> Bool {
        let continuation: CheckedContinuation<[PayloadResult], any Error>?? = state.withLock { state in
            guard !state.finished else { return .none }
            state.finished = true
            defer { state.continuation = nil }
            return .some(state.continuation)
        }
        guard case .some(let waiting) = continuation else { return false }
        waiting?.resume(throwing: error)
        return true
    }
}
