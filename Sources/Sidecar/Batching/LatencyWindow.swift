import Foundation
import Synchronization

/// Counts and latency percentiles over the last few seconds, for status pages and the autoscaler
/// (Prometheus histograms are cumulative since start; operators ask "how is it doing now").
///
/// One bucket per second in a ring; each holds a count and a log-scale histogram (25% wide bins from
/// 50 µs), so recording is a lock, an index and two increments.
final class LatencyWindow: Sendable {
    static let seconds = 10
    private static let bins = 64
    private static let base = 50e-6
    private static let growth = 1.25

    private struct Bucket {
        var second: Int64 = -1
        var count = 0
        var histogram = [Int](repeating: 0, count: LatencyWindow.bins)
    }

    private let buckets = Mutex([Bucket](repeating: Bucket(), count: LatencyWindow.seconds))
    private let origin = ContinuousClock.now

    private func second(_ instant: ContinuousClock.Instant) -> Int64 { (instant - origin).components.seconds }

    func record(_ latency: Duration, at now: ContinuousClock.Instant = .now) {
        let value = latency.inSeconds
        let bin = value <= Self.base ? 0 : Swift.min(Self.bins - 1, Int((value / Self.base).logarithm(Self.growth)) + 1)
        let s = second(now)
        buckets.withLock { buckets in
            let slot = Int(s % Int64(Self.seconds))
            if buckets[slot].second != s { buckets[slot] = Bucket(second: s) }
            buckets[slot].count += 1
            buckets[slot].histogram[bin] += 1
        }
    }

    /// Events per second and the p99 latency over the last `seconds` complete and current seconds.
    func snapshot(seconds span: Int = LatencyWindow.seconds, now: ContinuousClock.Instant = .now) -> (perSecond: Double, p99: Duration?) {
        let s = second(now)
        let span = Swift.max(1, Swift.min(span, Self.seconds))
        var histogram = [Int](repeating: 0, count: Self.bins)
        var count = 0
        buckets.withLock { buckets in
            for bucket in buckets where bucket.second > s - Int64(span) && bucket.second <= s {
                count += bucket.count
                for index in 0..<Self.bins { histogram[index] += bucket.histogram[index] }
            }
        }
        // The current second is partial: count it as the fraction elapsed so far.
        let elapsed = (now - origin) - .seconds(s)
        let covered = Double(span - 1) + elapsed.inSeconds
        let rate = Double(count) / Swift.max(covered, 0.001)
        guard count > 0 else { return (rate, nil) }
        var target = Int((Double(count) * 0.99).rounded(.up))
        for (index, n) in histogram.enumerated() {
            target -= n
            if target <= 0 {
                let upper = Self.base * pow(Self.growth, Double(index))
                return (rate, .microseconds(Int64(upper * 1e6)))
            }
        }
        return (rate, nil)
    }
}

private extension Double {
    func logarithm(_ base: Double) -> Double { log(self) / log(base) }
}
