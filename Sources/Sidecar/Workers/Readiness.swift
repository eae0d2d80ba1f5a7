import Synchronization

/// Whether an executor could start: resolved once (ready, or the reason it cannot serve), awaited
/// by the load. Cancelling a waiter ends its wait with `CancellationError`, so a load given up
/// before the executor runs (or while it starts) does not hang.
final class Readiness: Sendable {
    private struct State {
        var outcome: Result<Void, SidecarError>?
        /// Callers of ``wait()``, by id so that a cancelled one can be taken out.
        var waiters: [UInt64: CheckedContinuation<Void, any Error>] = [:]
        var nextID: UInt64 = 0
        /// Waiters cancelled before they registered (the cancellation handler ran first).
        var cancelled: Set<UInt64> = []
    }

    private let state = Mutex(State())

    /// Nil until resolved.
    var outcome: Result<Void, SidecarError>? { state.withLock { $0.outcome } }

    var isReady: Bool {
        guard case .success = outcome else { return false }
        return true
    }

    /// The first call wins; later ones are ignored.
    func resolve(_ outcome: Result<Void, SidecarError>) {
        let waiters: [CheckedContinuation<Void, any Error>] = state.withLock { state in
            guard state.outcome == nil else { return [] }
            state.outcome = outcome
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume(with: outcome.mapError { $0 as any Error }) }
    }

    /// Returns once resolved as ready; throws the reason otherwise, or `CancellationError`.
    func wait() async throws {
        let id = state.withLock { state -> UInt64 in
            state.nextID += 1
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLock { state in
                    if state.cancelled.remove(id) != nil { return .failure(CancellationError()) }
                    if let outcome = state.outcome { return outcome.mapError { $0 as any Error } }
                    state.waiters[id] = continuation
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                if let waiter = state.waiters.removeValue(forKey: id) { return waiter }
                state.cancelled.insert(id)
                return nil
            }
            waiter?.resume(throwing: CancellationError())
        }
    }
}
