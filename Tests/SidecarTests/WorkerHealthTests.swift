import Testing
@testable import Sidecar

/// Each health threshold, one look at a time, without a process (SupervisionTests kill real ones).
@Suite struct WorkerHealthTests {
    let t0 = ContinuousClock.now

    func health(maxRSS: Int = 0, itemLimit: Int? = nil) -> WorkerHealth {
        var timeouts = ModelConfiguration.Timeouts()
        timeouts.startup = .seconds(10)
        timeouts.pingTimeout = .seconds(2)
        timeouts.batch = .seconds(5)
        var recycle = ModelConfiguration.Recycle()
        recycle.maxRSSMegabytes = maxRSS
        return WorkerHealth(timeouts: timeouts, recycle: recycle, itemLimit: itemLimit)
    }

    func seen(after seconds: Double, ready: Bool = true, draining: Bool = false, pongAgo: Double = 0,
              batchFor: Double? = nil, rssMiB: Int? = 50, served: Int = 0) -> WorkerHealth.Observation {
        let now = t0.advanced(by: .milliseconds(Int64(seconds * 1000)))
        return WorkerHealth.Observation(
            now: now, ready: ready, draining: draining, startupDeadline: t0.advanced(by: .seconds(10)),
            lastPong: now.advanced(by: .milliseconds(-Int64(pongAgo * 1000))),
            oldestBatchStart: batchFor.map { now.advanced(by: .milliseconds(-Int64($0 * 1000))) },
            residentBytes: rssMiB.map { $0 << 20 }, itemsServed: served)
    }

    @Test func startupHasItsOwnTimeout() {
        #expect(health().verdict(seen(after: 9, ready: false, pongAgo: 9)) == .healthy, "pings do not count before ready")
        guard case .startupTimedOut(let why) = health().verdict(seen(after: 11, ready: false)) else { Issue.record("expected a startup timeout"); return }
        #expect(why.contains("timeouts.startup_s"))
    }

    @Test func aSilentPythonLoopIsHungAndALongBatchIsStuck() {
        #expect(health().verdict(seen(after: 30, pongAgo: 1.5)) == .healthy)
        guard case .unresponsive(let hung) = health().verdict(seen(after: 30, pongAgo: 2.5)) else { Issue.record("expected hung"); return }
        #expect(hung.hasPrefix("hung"))
        #expect(health().verdict(seen(after: 30, batchFor: 4.9)) == .healthy, "a busy worker still answers pings")
        guard case .unresponsive(let stuck) = health().verdict(seen(after: 30, batchFor: 5.1)) else { Issue.record("expected stuck"); return }
        #expect(stuck.hasPrefix("stuck"))
    }

    @Test func recyclingLimitsApplyOnlyToAServingWorker() {
        let limited = health(maxRSS: 100, itemLimit: 30)
        #expect(limited.verdict(seen(after: 30, served: 29)) == .healthy)
        #expect(limited.verdict(seen(after: 30, served: 30)) == .recycle("handled 30 items (recycle.max_requests)"))
        #expect(limited.verdict(seen(after: 30, rssMiB: 101)) == .recycle("resident memory 101 MiB is over 100 MiB (recycle.max_rss_mb)"))
        #expect(limited.verdict(seen(after: 30, draining: true, served: 99)) == .healthy, "a draining worker is leaving anyway")
        #expect(health().verdict(seen(after: 30, rssMiB: 100_000, served: 1_000_000)) == .healthy, "no limits set")
    }
}
