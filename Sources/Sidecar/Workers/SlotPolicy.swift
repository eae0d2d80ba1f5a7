import Foundation

/// The supervision policy of one worker slot, as a state machine: what to do when a worker becomes
/// ready, asks to be recycled, exits; when a backoff ends; when the slot is retired or the pool
/// stops. It owns no process and no clock: `handle(_:)` takes an event and returns the actions the
/// slot's runner (``WorkerPool``) carries out, so every decision is unit-tested without Python
/// (`SlotPolicyTests`), the way gunicorn's arbiter reads as one policy.
///
/// Workers are named by their generation within the slot. At most two are alive: `current`, which
/// serves, and `incoming`, a recycled worker's successor starting while `current` still serves.
/// Workers that were retired but have not exited yet (draining) are alive too, in neither role.
struct SlotPolicy {
    /// What the runner knows about the pool when an event arrives.
    struct Pool: Equatable {
        /// The pool is stopping (unload, shutdown, or the model FAILED): start nothing.
        var stopping = false
        /// The pool's first readiness is not settled yet: a first start that fails is reported,
        /// not retried.
        var awaitingFirstReadiness = false
    }

    /// How one worker ended, as far as the policy cares.
    struct Exit: Equatable {
        var becameReady: Bool
        /// It was asked to leave (retired, or the model stopped): not a failure.
        var retired: Bool
        /// Killed by a SIGKILL the supervisor did not send (an operator, the OOM killer).
        var killedFromOutside: Bool
        /// Batches it had not answered (handed back to the batcher by the runner).
        var unanswered: Int
        /// "exited with status 1", "hung: ..."
        var reason: String
    }

    enum Event: Equatable {
        /// The runner starts the slot.
        case begin
        case ready(generation: Int)
        case recycle(generation: Int, reason: String)
        case exited(generation: Int, Exit)
        /// A backoff ended.
        case restart
        /// The slot leaves the pool (scale-down, or the model failed).
        case retire
        /// The pool is stopping.
        case stop
    }

    enum Action: Equatable {
        /// Spawn worker `generation`.
        case start(generation: Int)
        /// Make `generation` (or nothing) the worker the slot's status shows; the one it replaces
        /// has exited.
        case show(generation: Int?)
        /// A recycled worker's successor is ready and now shows; the old one drains, still counted.
        case handOver(from: Int, to: Int)
        /// Ask a worker to leave: no new batch, finish those in flight, exit.
        case retireWorker(generation: Int)
        /// A retired worker finished draining and exited: its counts move into the slot's history.
        case drained(generation: Int)
        /// The slot's worker serves: counts toward the pool's readiness.
        case slotReady
        /// A worker died that should have lived: record it in the slot's status and metrics.
        case countRestart(message: String)
        /// A failure that is the model's doing: feed the crash-loop breaker.
        case recordFailure
        /// The first start failed: the pool reports it rather than retrying a handler that cannot load.
        case failFirstStart
        /// Start a replacement after this backoff.
        case scheduleRestart(after: Duration)
        case log(Log)
        /// Nothing is alive and nothing will start: the slot ends.
        case finish
    }

    enum Log: Equatable {
        case recycling(reason: String)
        case successorFailed(reason: String)
        case died(message: String, unanswered: Int)
    }

    private(set) var alive: Set<Int> = []
    /// Alive workers that have been ready (the others are still loading their handler).
    private(set) var served: Set<Int> = []
    private(set) var current: Int?
    private(set) var incoming: Int?
    private(set) var leaving = false
    private(set) var finished = false
    private var nextGeneration = 0
    private var failuresInARow = 0
    private let maxBackoff: Duration
    /// A factor in 0.5...1.0 drawn per restart, so that replacements of several workers do not
    /// start in lockstep (injected so tests are deterministic).
    private let jitter: () -> Double

    init(maxBackoff: Duration, jitter: @escaping () -> Double = { Double.random(in: 0.5...1.0) }) {
        self.maxBackoff = maxBackoff
        self.jitter = jitter
    }

    /// The exponential backoff before restart number `failuresInARow` (0: the worker had served).
    func backoff(failuresInARow: Int) -> Duration {
        let seconds = min(maxBackoff.inSeconds, 0.1 * pow(2.0, Double(min(failuresInARow, 30)))) * jitter()
        return .milliseconds(Int64(seconds * 1000))
    }

    mutating func handle(_ event: Event, pool: Pool) -> [Action] {
        // A finished slot has nothing left to decide; late events (a backoff that fired as the slot
        // ended) are dropped here rather than starting a worker no one supervises.
        guard !finished else { return [] }
        var actions = transition(event, pool: pool)
        if alive.isEmpty, leaving || pool.stopping {
            finished = true
            actions.append(.finish)
        }
        return actions
    }

    private mutating func start() -> Action {
        let generation = nextGeneration
        nextGeneration += 1
        alive.insert(generation)
        return .start(generation: generation)
    }

    private mutating func transition(_ event: Event, pool: Pool) -> [Action] {
        switch event {
        case .begin:
            guard current == nil, alive.isEmpty, !pool.stopping else { return [] }
            let start = start()
            guard case .start(let generation) = start else { return [] }
            current = generation
            return [start, .show(generation: generation)]

        case .ready(let generation):
            guard alive.contains(generation) else { return [] }
            served.insert(generation)
            if generation == incoming, let old = current {
                // The successor is ready: only now does the old worker stop taking batches.
                current = generation
                incoming = nil
                return [.retireWorker(generation: old), .handOver(from: old, to: generation), .slotReady]
            }
            return generation == current ? [.slotReady] : []

        case .recycle(let generation, let reason):
            guard generation == current, incoming == nil, !leaving, !pool.stopping else { return [] }
            let start = start()
            guard case .start(let successor) = start else { return [] }
            incoming = successor
            return [.log(.recycling(reason: reason)), start]

        case .exited(let generation, let exit):
            guard alive.remove(generation) != nil else { return [] }
            served.remove(generation)
            return exited(generation, exit, pool: pool)

        case .restart:
            guard current == nil, !leaving, !pool.stopping else { return [] }
            let start = start()
            guard case .start(let generation) = start else { return [] }
            current = generation
            return [start, .show(generation: generation)]

        case .retire:
            leaving = true
            incoming = nil
            return alive.sorted().map { .retireWorker(generation: $0) }

        case .stop:
            // Ready workers drain what is queued and exit once the closed queue is empty; a worker
            // still loading its handler has nothing to finish and would hold the stop up for as
            // long as its load takes (up to startup_s): it leaves at once.
            return alive.subtracting(served).sorted().map { .retireWorker(generation: $0) }
        }
    }

    private mutating func exited(_ generation: Int, _ exit: Exit, pool: Pool) -> [Action] {
        if generation == incoming {
            incoming = nil
            // Stopping while the successor was starting: it just leaves with the rest.
            if exit.retired || pool.stopping || leaving { return [] }
            var actions: [Action] = [.log(.successorFailed(reason: exit.reason))]
            if !exit.killedFromOutside { actions.append(.recordFailure) }
            return actions
        }
        guard generation == current else { return [.drained(generation: generation)] }  // a recycled worker finished draining
        current = nil
        var actions: [Action] = [.show(generation: nil)]
        if exit.retired || pool.stopping || leaving { return actions }

        actions.append(.countRestart(message: exit.reason))
        actions.append(.log(.died(message: exit.reason, unanswered: exit.unanswered)))
        if pool.awaitingFirstReadiness, !exit.becameReady {
            leaving = true
            actions.append(.failFirstStart)
            return actions
        }
        // A death while running a batch is blamed on the batch (poison isolation splits it), and a
        // SIGKILL from outside is not the model's doing; anything else counts toward the breaker.
        if exit.unanswered == 0, !exit.killedFromOutside { actions.append(.recordFailure) }
        if let successor = incoming {
            // It died while its successor was starting: the successor takes over, no restart.
            current = successor
            incoming = nil
            actions.append(.show(generation: successor))
            return actions
        }
        failuresInARow = exit.becameReady ? 0 : failuresInARow + 1
        actions.append(.scheduleRestart(after: backoff(failuresInARow: failuresInARow)))
        return actions
    }
}
