import Foundation

/// Why a request was refused at arrival (the `reason` label of `sidecar_admission_refused_total`).
public enum RefusalReason: String, Sendable, CaseIterable {
    /// The queue holds `max_queue` items.
    case queueFull = "queue_full"
    /// Over the adaptive limit, which keeps accepted items waiting about `target_queue_delay_ms`.
    case queueDelay = "queue_delay"
    /// At the rate the workers drain the queue, the request would wait past its own deadline.
    case deadline
}

/// What a model's admission looks like now, for `/status` and the metrics.
public struct AdmissionStatus: Sendable, Equatable {
    /// `fixed` (max_queue only) or `adaptive` (a queue-delay target).
    public var mode: String
    /// The queued items admitted now: `max_queue`, or the adaptive limit below it.
    public var limit: Int
    public var targetQueueDelayMilliseconds: Double?
    /// Items per second the workers took from the queue while it was never empty (the last
    /// estimate), nil before the queue was first backlogged.
    public var drainRate: Double?
    /// The least time an item dispatched in the last interval had waited, in milliseconds (CoDel's
    /// signal: a standing queue shows as a minimum above zero).
    public var minQueueDelayMilliseconds: Double?
    /// The last interval's dispatched items all waited past the target (the limit is shrinking).
    public var standingQueue: Bool
    public var refused: [RefusalReason: Int]
}

/// How a model decides, as a request arrives, whether to queue it: a value kept under the
/// batcher's lock, so the decision and the queue it looks at are one.
///
/// Fixed (the default): up to `max_queue` items wait; past that a request is refused.
///
/// Adaptive (`batching.target_queue_delay_ms`): a limit on queued items below `max_queue`, moved
/// by what accepted items actually waited. Over each interval (100 ms) the least wait of the items
/// dispatched is CoDel's standing-queue signal: when even that one waited past the target, the
/// queue is standing, not a burst passing through, and the limit shrinks by target ÷ least wait
/// (at most by half at once), as a gradient concurrency limit does; otherwise it grows back by a
/// tenth per interval, up to four targets' worth at the drain rate (or `max_queue`). A burst at
/// low load therefore passes, and under a sustained overload the limit settles where accepted
/// items wait about the target. The
/// drain rate (items dispatched per interval while the queue never emptied: the workers' capacity
/// as it is now, smoothed) prices a request's deadline: one that would wait longer than its own
/// deadline behind what is queued is refused at once rather than timed out later after it took
/// a place.
///
/// Refusing early is what keeps goodput at capacity under overload: accepted requests wait about
/// the target, no longer than a full queue's worth, and no one holds a place only to time out.
struct Admission {
    let maxQueue: Int
    let target: Duration?
    /// The smallest adaptive limit: one full batch, so batches stay whole while the queue is short.
    let floor: Int
    /// The interval over which the drain rate and the minimum wait are measured.
    static let interval: Duration = .milliseconds(100)

    private(set) var limit: Int
    private(set) var drainRate: Double?
    private(set) var minWait: Duration?
    private(set) var refused: [RefusalReason: Int] = [:]
    /// A standing queue: the last interval's every item waited past the target.
    private(set) var standing = false

    private var intervalStart: ContinuousClock.Instant
    private var intervalDispatched = 0
    private var intervalMinWait: Duration?
    /// The queue emptied during the interval: the workers were not the limit, so the items
    /// dispatched are not their rate.
    private var intervalIdle = false

    init(maxQueue: Int, maxBatchSize: Int, target: Duration?, now: ContinuousClock.Instant = .now) {
        self.maxQueue = maxQueue
        self.target = target
        self.floor = min(maxQueue, maxBatchSize)
        self.limit = maxQueue
        self.intervalStart = now
    }

    /// Nil when a request of `count` items may queue behind `queued`, else why not.
    mutating func decide(queued: Int, count: Int, deadline: ContinuousClock.Instant?, now: ContinuousClock.Instant) -> RefusalReason? {
        roll(now: now)
        let reason: RefusalReason?
        if queued + count > maxQueue {
            reason = .queueFull
        } else if target != nil, queued > 0, queued + count > limit {
            // A request always gets in when the queue is empty, whatever its size: the limit
            // bounds waiting, and an empty queue has none.
            reason = .queueDelay
        } else if target != nil, queued > 0, let deadline, let rate = drainRate, rate > 0,
            now.advanced(by: .seconds(Double(queued + count) / rate)) > deadline
        {
            // Its answer comes after what is queued ahead and its own items; an empty queue is
            // never priced (a free worker may take the request at once).
            reason = .deadline
        } else {
            reason = nil
        }
        if let reason { refused[reason, default: 0] += 1 }
        return reason
    }

    /// Counts a refusal decided elsewhere (the fronts' early look) under `reason`.
    mutating func count(_ reason: RefusalReason) { refused[reason, default: 0] += 1 }

    /// Whether a request could be queued now at all: the fronts' look before they read its body.
    /// Nil means maybe (the full decision comes with the items); a reason means certainly not.
    func earlyRefusal(queued: Int) -> RefusalReason? {
        if queued >= maxQueue { return .queueFull }
        if target != nil, queued > 0, queued >= limit { return .queueDelay }
        return nil
    }

    /// A batch left the queue: `items` items, the one that waited least having waited `leastWait`;
    /// `emptied` when nothing is left queued.
    mutating func dispatched(items: Int, leastWait: Duration, emptied: Bool, now: ContinuousClock.Instant) {
        roll(now: now)
        intervalDispatched += items
        intervalMinWait = min(intervalMinWait ?? leastWait, leastWait)
        if emptied { intervalIdle = true }
    }

    /// The queue ran empty (a worker found nothing to take).
    mutating func ranEmpty(now: ContinuousClock.Instant) {
        roll(now: now)
        intervalIdle = true
    }

    private func inSeconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    /// Closes the intervals that ended by `now`: the drain rate of a backlogged one, and the limit.
    private mutating func roll(now: ContinuousClock.Instant) {
        let elapsed = now - intervalStart
        guard elapsed >= Self.interval else { return }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        if !intervalIdle, intervalDispatched > 0, elapsed < Self.interval * 4 {
            // A backlogged interval: what the workers took is what they can take. Smoothed over a
            // few intervals (a handler's pace varies batch to batch), quick to follow a change.
            let rate = Double(intervalDispatched) / seconds
            drainRate = drainRate.map { $0 * 0.7 + rate * 0.3 } ?? rate
        }
        minWait = intervalMinWait
        if let target {
            // CoDel's signal, a gradient's step: when every item dispatched in the interval waited
            // past the target the queue is standing, and the limit shrinks by the ratio (at most by
            // half at once); otherwise it grows back a tenth per interval, so a burst that met a
            // short queue is not refused, and one quick item amid an overload does not undo it.
            if !intervalIdle, let least = intervalMinWait, least > target {
                standing = true
                let ratio = Swift.max(0.5, inSeconds(target) / inSeconds(least))
                limit = Swift.max(floor, Int((Double(limit) * ratio).rounded()))
            } else if intervalIdle || intervalMinWait != nil {
                standing = false
                // A tenth per interval that passed: after a calm with no traffic (no call to roll
                // in between), the limit is as far back as if every interval had been seen.
                let passed = Swift.min(64, Int(seconds / inSeconds(Self.interval)))
                for _ in 0..<Swift.max(1, passed) where limit < ceiling {
                    limit = Swift.min(ceiling, limit + Swift.max(1, limit / 10))
                }
            }
            limit = Swift.min(limit, ceiling)
        }
        intervalStart = now
        intervalDispatched = 0
        intervalMinWait = nil
        intervalIdle = false
    }

    /// How far the adaptive limit grows back: four targets' worth at the measured drain rate (a
    /// burst may wait up to four targets before the limit cuts it), `max_queue` before any rate is
    /// known. Without it a long calm would let the next overload's first wave fill all of
    /// `max_queue` and wait its whole length.
    private var ceiling: Int {
        guard let target, let rate = drainRate else { return maxQueue }
        // At least four batches: with room for only one, every batch taken would empty the queue,
        // no interval would be backlogged, and the drain rate could never be measured again.
        return Swift.min(maxQueue, Swift.max(floor * 4, Int((rate * inSeconds(target) * 4).rounded(.up))))
    }

    func status() -> AdmissionStatus {
        AdmissionStatus(
            mode: target == nil ? "fixed" : "adaptive", limit: target == nil ? maxQueue : limit,
            targetQueueDelayMilliseconds: target.map { $0.inMilliseconds }, drainRate: drainRate,
            minQueueDelayMilliseconds: minWait.map { $0.inMilliseconds }, standingQueue: standing, refused: refused)
    }
}
