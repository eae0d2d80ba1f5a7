import Foundation
import Logging
import Metrics

/// What the autoscaler is doing, for status pages (`workers: {min, max}` in `sidecar.yaml`).
public struct AutoscalerStatus: Sendable, Equatable {
    public var min: Int
    public var max: Int
    /// False once an operator set the worker count by hand: their decision wins until a reload.
    public var enabled = true
    /// The last decision, one line ("up to 3: items waited 120 ms (p99) for 1.0 s").
    public var lastDecision: String?
    public var lastDecisionAt: Date?
}

/// Scales a worker pool between `min` and `max` on what callers feel: the queue wait.
///
/// Every half second it looks at the p99 queue wait of the last second, the queue depth and how busy
/// the workers are. Up, by one worker, when items waited past `target_queue_ms` (or more is queued
/// than the workers take in one round) for two looks in a row. Down, by one, after
/// `scale_down_after_s` with an empty queue, short waits and workers busy less than half the time.
/// The two thresholds are far apart and every change is followed by a cooldown, so it does not flap.
struct Autoscaler: Sendable {
    let bounds: ModelConfiguration.Autoscaling
    let pool: WorkerPool
    let batcher: Batcher
    let status: LockedBox<AutoscalerStatus>
    let logger: Logger

    static let tick: Duration = .milliseconds(500)
    static let cooldown: Duration = .seconds(3)

    func run() async {
        var hotLooks = 0
        var calmSince: ContinuousClock.Instant?
        var busy = 0.0  // exponential average of the busy fraction
        var quietUntil = ContinuousClock.now
        while !Task.isCancelled {
            try? await Task.sleep(for: Self.tick)
            guard !Task.isCancelled, pool.failure == nil, status.withLock({ $0.enabled }) else { continue }
            let now = ContinuousClock.now
            let workers = pool.workers
            let size = workers.count
            let serving = workers.filter { $0.state.isServing }
            let busyNow = serving.isEmpty ? 1.0 : Double(serving.filter { $0.state == .busy }.count) / Double(serving.count)
            busy = 0.7 * busy + 0.3 * busyNow
            let queued = batcher.queuedItems
            let wait = batcher.recentQueueWaits.snapshot(seconds: 1, now: now).p99 ?? .zero

            let backlog = queued > size * batcher.maxBatchSize
            hotLooks = (wait > bounds.targetQueueWait || backlog) ? hotLooks + 1 : 0
            let calm = queued == 0 && wait < bounds.targetQueueWait / 4 && busy < 0.5
            calmSince = calm ? (calmSince ?? now) : nil
            guard now >= quietUntil else { continue }

            if hotLooks >= 2, size < bounds.max {
                let why = backlog
                    ? "\(queued) items queued, more than \(size) worker(s) take in one round"
                    : "items waited \(Self.ms(wait)) ms (p99), over target_queue_ms \(Self.ms(bounds.targetQueueWait))"
                await change(to: size + 1, direction: "up", why: why)
                hotLooks = 0
                calmSince = nil
                quietUntil = ContinuousClock.now.advanced(by: Self.cooldown)
            } else if let since = calmSince, now - since >= bounds.scaleDownAfter, size > bounds.min {
                await change(to: size - 1, direction: "down", why: "quiet for \(bounds.scaleDownAfter): empty queue, workers busy \(Int(busy * 100))% of the time")
                calmSince = nil
                quietUntil = ContinuousClock.now.advanced(by: Self.cooldown)
            }
        }
    }

    private func change(to target: Int, direction: String, why: String) async {
        let line = "\(direction) to \(target): \(why)"
        logger.info("autoscaler: \(line)")
        status.withLock {
            $0.lastDecision = line
            $0.lastDecisionAt = Date()
        }
        Counter(label: "sidecar_autoscaler_decisions_total", dimensions: [("model", pool.spec.model), ("direction", direction)]).increment()
        do {
            try await pool.resize(to: target, timeout: .seconds(300))
        } catch {
            logger.warning("autoscaler: scaling \(direction) to \(target) did not complete: \(error)")
        }
    }

    private static func ms(_ duration: Duration) -> Int { Int(duration.inMilliseconds) }
}
