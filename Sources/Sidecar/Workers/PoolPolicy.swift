import DequeModule

/// The crash-loop breaker, as a value: failures that are the model's doing (a worker dying while
/// idle, a successor that cannot start) are recorded with the time they happened; `max_failures`
/// of them within `window_s` trip it, once. It owns no clock (the instant comes with each failure),
/// so `PoolPolicyTests` drive it through time without waiting.
struct CrashLoopBreaker {
    let maxFailures: Int
    let window: Duration
    /// Recent failures, oldest first, none older than `window` before the last one.
    private(set) var recent: Deque<ContinuousClock.Instant> = []
    private(set) var tripped = false

    init(_ policy: ModelConfiguration.RestartPolicy) {
        maxFailures = policy.maxFailures
        window = policy.window
    }

    /// Records a failure at `now`; true only for the failure that trips the breaker (a tripped
    /// breaker records nothing more, so the model is failed once).
    mutating func record(at now: ContinuousClock.Instant) -> Bool {
        guard !tripped else { return false }
        recent.append(now)
        while let first = recent.first, now - first > window { recent.removeFirst() }
        tripped = recent.count >= maxFailures
        return tripped
    }
}

/// What a resize of the pool does, decided from the slots it has: which slots to add, or which to
/// retire. Slots keep indexes `0..<n` (worker 0, 1, ...): growing fills the lowest free indexes,
/// shrinking retires the highest, so a pool scaled down and up again shows the same workers.
struct ResizePlan: Equatable {
    var added: [Int] = []
    var retired: [Int] = []

    init(added: [Int] = [], retired: [Int] = []) {
        self.added = added
        self.retired = retired
    }

    /// The plan that takes a pool with `slots` to `target` slots (`target` ≥ 1, checked by the caller).
    init(slots: Set<Int>, target: Int) {
        if target > slots.count {
            var next = 0
            while slots.count + added.count < target {
                if !slots.contains(next) { added.append(next) }
                next += 1
            }
        } else {
            retired = Array(slots.sorted().suffix(slots.count - target))
        }
    }
}
