/// The health verdict on one worker at one look, from what the supervisor observed: the four
/// signals besides the process exit — startup (not ready within `startup_s`), the Python loop (no
/// pong for `ping_timeout_s`: hung), progress (the oldest batch running past `batch_timeout_s`:
/// stuck) — and the `recycle:` limits. A pure function of its inputs, so every threshold is
/// unit-tested without a process (`WorkerHealthTests`); ``WorkerProcess`` looks once per
/// `ping_interval_s` and acts on the verdict.
struct WorkerHealth {
    let timeouts: ModelConfiguration.Timeouts
    let recycle: ModelConfiguration.Recycle
    /// Items this process may handle before it is recycled (nil: no limit; jitter already drawn).
    let itemLimit: Int?

    struct Observation {
        var now: ContinuousClock.Instant
        var ready: Bool
        var draining: Bool
        var startupDeadline: ContinuousClock.Instant
        var lastPong: ContinuousClock.Instant
        /// When the oldest batch in flight started (nil: none in flight).
        var oldestBatchStart: ContinuousClock.Instant?
        var residentBytes: Int?
        var itemsServed: Int
    }

    enum Verdict: Equatable {
        case healthy
        /// Not ready in time: kill it.
        case startupTimedOut(String)
        /// Hung or stuck: kill its process group; its batches go back to the batcher.
        case unresponsive(String)
        /// Past a `recycle:` limit: start its successor, then retire it.
        case recycle(String)
    }

    func verdict(_ seen: Observation) -> Verdict {
        if !seen.ready, seen.now > seen.startupDeadline {
            return .startupTimedOut("did not become ready within \(timeouts.startup) (timeouts.startup_s)")
        }
        if seen.ready, seen.now - seen.lastPong > timeouts.pingTimeout {
            return .unresponsive("hung: no answer to pings for \(timeouts.pingTimeout) (timeouts.ping_timeout_s)")
        }
        if let started = seen.oldestBatchStart, seen.now - started > timeouts.batch {
            return .unresponsive("stuck: a batch ran past \(timeouts.batch) (timeouts.batch_timeout_s)")
        }
        guard seen.ready, !seen.draining else { return .healthy }
        if let itemLimit, seen.itemsServed >= itemLimit {
            return .recycle("handled \(seen.itemsServed) items (recycle.max_requests)")
        }
        let limit = recycle.maxRSSMegabytes
        if limit > 0, let rss = seen.residentBytes, rss > limit << 20 {
            return .recycle("resident memory \(rss >> 20) MiB is over \(limit) MiB (recycle.max_rss_mb)")
        }
        return .healthy
    }
}
