import Foundation

/// The circuit breaker of one model (`breaker:` in `sidecar.yaml`): a value under the model guard's
/// lock. Closed, it counts outcomes in a sliding window of ten buckets; when at least
/// `failureRate` of at least `minRequests` requests failed, it opens, and requests go to the
/// fallback (or fail fast) without queueing at the primary. After `coolDown` it is half-open:
/// `probes` requests reach the primary; if all succeed it closes, if one fails it opens again.
///
/// Only the primary's own failures count: handler errors, timeouts, an unavailable model. A full
/// queue is overload, not failure (admission and the fallback answer it), and a bad request is the
/// caller's.
struct CircuitBreaker: Sendable {
    enum State: String, Sendable {
        case closed, open
        case halfOpen = "half_open"
    }

    enum Decision: Equatable {
        /// Send to the primary.
        case primary
        /// Send to the primary as a probe of half-open round `round`.
        case probe(round: Int)
        /// Do not: the breaker is open (or its probes are all out) for `retryAfter` more.
        case open(retryAfter: Duration)
    }

    enum Outcome { case success, failure, neutral }

    struct Transition: Sendable {
        var from: State
        var to: State
        var why: String
    }

    private struct Bucket {
        var epoch = -1
        var requests = 0
        var failures = 0
    }

    let settings: ModelConfiguration.Breaker
    private(set) var state: State = .closed
    private(set) var openedAt: ContinuousClock.Instant?
    private(set) var opened = 0
    private var buckets = [Bucket](repeating: Bucket(), count: 10)
    private var probesOut = 0
    private var probesSucceeded = 0
    /// Which half-open round the probes out belong to: an answer from an earlier round counts in none.
    private(set) var round = 0
    private let origin: ContinuousClock.Instant

    init(settings: ModelConfiguration.Breaker, now: ContinuousClock.Instant = .now) {
        self.settings = settings
        self.origin = now
    }

    /// Requests and failures counted in the window ending at `now`.
    func window(now: ContinuousClock.Instant) -> (requests: Int, failures: Int) {
        let current = epoch(now)
        return buckets.reduce(into: (0, 0)) { total, bucket in
            guard bucket.epoch > current - buckets.count else { return }
            total.0 += bucket.requests
            total.1 += bucket.failures
        }
    }

    /// Moves an open breaker whose cool-down has passed to half-open: on the clock, not only when
    /// a request comes (status and metrics read it through here too).
    mutating func advance(now: ContinuousClock.Instant) -> Transition? {
        guard state == .open, let openedAt, now >= openedAt + settings.coolDown else { return nil }
        state = .halfOpen
        probesOut = 0
        probesSucceeded = 0
        round += 1
        return Transition(from: .open, to: .halfOpen, why: "cool-down of \(settings.coolDown) passed; letting \(settings.probes) probe request(s) through")
    }

    /// Whether a request may go to the primary now.
    mutating func decide(now: ContinuousClock.Instant) -> (Decision, Transition?) {
        let transition = advance(now: now)
        switch state {
        case .closed:
            return (.primary, transition)
        case .halfOpen where probesOut < settings.probes:
            probesOut += 1
            return (.probe(round: round), transition)
        case .halfOpen:
            // Every probe is out: wait for their answers before sending more.
            return (.open(retryAfter: .seconds(1)), transition)
        case .open:
            return (.open(retryAfter: (openedAt ?? now) + settings.coolDown - now), transition)
        }
    }

    /// Counts a request's outcome (`probe`: the round of the probe it was); returns the transition
    /// it caused, if any.
    mutating func record(_ outcome: Outcome, probe: Int? = nil, now: ContinuousClock.Instant) -> Transition? {
        if let probe {
            guard state == .halfOpen, probe == round else { return nil }
            switch outcome {
            case .neutral:
                probesOut = max(0, probesOut - 1)  // it said nothing about the primary: another request may probe
                return nil
            case .failure:
                return trip(now: now, why: "a probe request failed")
            case .success:
                probesSucceeded += 1
                guard probesSucceeded >= settings.probes else { return nil }
                state = .closed
                openedAt = nil
                buckets = [Bucket](repeating: Bucket(), count: buckets.count)
                return Transition(from: .halfOpen, to: .closed, why: "\(settings.probes) probe request(s) succeeded")
            }
        }
        // An answer to a request sent before the breaker opened says nothing new.
        guard state == .closed, outcome != .neutral else { return nil }
        let current = epoch(now)
        let index = current % buckets.count
        if buckets[index].epoch != current { buckets[index] = Bucket(epoch: current) }
        buckets[index].requests += 1
        if outcome == .failure { buckets[index].failures += 1 }
        let (requests, failures) = window(now: now)
        guard requests >= settings.minRequests, Double(failures) >= settings.failureRate * Double(requests) else { return nil }
        return trip(now: now, why: "\(failures) of \(requests) requests failed within \(settings.window) (breaker.failure_rate \(settings.failureRate))")
    }

    private mutating func trip(now: ContinuousClock.Instant, why: String) -> Transition {
        let from = state
        state = .open
        openedAt = now
        opened += 1
        return Transition(from: from, to: .open, why: why + "; open for \(settings.coolDown) (breaker.cool_down_s)")
    }

    /// The bucket number of `now`: ten buckets span the window.
    private func epoch(_ now: ContinuousClock.Instant) -> Int {
        let width = settings.window / buckets.count
        return max(0, Int((now - origin) / width))
    }
}
