import Foundation
import Testing
@testable import Sidecar

/// Admission on its own: a value, with time passed in, so each interval is exact.
@Suite struct AdmissionTests {
    let start = ContinuousClock.now

    func at(_ ms: Int) -> ContinuousClock.Instant { start.advanced(by: .milliseconds(ms)) }

    /// Drives `intervals` backlogged intervals of 100 ms, dispatching `perInterval` items whose
    /// least wait is `wait`, starting at `from` ms; returns the time after the last.
    @discardableResult
    func backlogged(_ a: inout Admission, from: Int, intervals: Int, perInterval: Int, wait: Duration) -> Int {
        var t = from
        for _ in 0..<intervals {
            a.dispatched(items: perInterval, leastWait: wait, emptied: false, now: at(t + 50))
            t += 100
            _ = a.decide(queued: 0, count: 1, deadline: nil, now: at(t))  // closes the interval
        }
        return t
    }

    @Test func fixedModeRefusesOnlyPastMaxQueue() {
        var a = Admission(maxQueue: 10, maxBatchSize: 4, target: nil, now: start)
        #expect(a.decide(queued: 9, count: 1, deadline: nil, now: at(1)) == nil)
        #expect(a.decide(queued: 9, count: 2, deadline: nil, now: at(1)) == .queueFull)
        // A long standing queue changes nothing without a target, and no deadline is priced.
        backlogged(&a, from: 0, intervals: 5, perInterval: 100, wait: .seconds(5))
        #expect(a.decide(queued: 9, count: 1, deadline: at(600), now: at(501)) == nil)
        #expect(a.status().limit == 10)
        #expect(a.status().mode == "fixed")
        #expect(a.status().refused == [.queueFull: 1])
        #expect(a.earlyRefusal(queued: 10) == .queueFull)
        #expect(a.earlyRefusal(queued: 9) == nil)
    }

    @Test func aStandingQueueShrinksTheLimitByTheRatioAndAtMostByHalf() {
        var a = Admission(maxQueue: 1000, maxBatchSize: 8, target: .milliseconds(20), now: start)
        #expect(a.status().limit == 1000)
        // (15,000 items per 100 ms: four targets' worth is far above max_queue, so only the ratio moves it.)
        // Every item waited 40 ms, twice the target: the limit halves.
        var t = backlogged(&a, from: 0, intervals: 1, perInterval: 15_000, wait: .milliseconds(40))
        #expect(a.status().limit == 500)
        #expect(a.status().standingQueue)
        // 400 ms is 20 × the target, but one step never cuts more than half.
        t = backlogged(&a, from: t, intervals: 1, perInterval: 15_000, wait: .milliseconds(400))
        #expect(a.status().limit == 250)
        // 25 ms: 0.8 of the limit.
        t = backlogged(&a, from: t, intervals: 1, perInterval: 15_000, wait: .milliseconds(25))
        #expect(a.status().limit == 200)
        // Never below one batch.
        t = backlogged(&a, from: t, intervals: 20, perInterval: 15_000, wait: .milliseconds(400))
        #expect(a.status().limit == 8)
        #expect(a.decide(queued: 8, count: 1, deadline: nil, now: at(t + 1)) == .queueDelay)
        #expect(a.earlyRefusal(queued: 8) == .queueDelay)
        // An empty queue always takes a request, whatever the limit.
        #expect(a.decide(queued: 0, count: 50, deadline: nil, now: at(t + 1)) == nil)
    }

    @Test func theLimitGrowsBackATenthPerIntervalOnceItemsGetThroughInTime() {
        var a = Admission(maxQueue: 100, maxBatchSize: 8, target: .milliseconds(20), now: start)
        var t = backlogged(&a, from: 0, intervals: 3, perInterval: 150, wait: .milliseconds(200))
        #expect(a.status().limit == 13)  // 100 → 50 → 25 → 12.5, rounded
        // One interval in which an item got through within the target: +max(1, limit/10).
        t = backlogged(&a, from: t, intervals: 1, perInterval: 150, wait: .milliseconds(5))
        #expect(a.status().limit == 14)
        #expect(!a.status().standingQueue)
        t = backlogged(&a, from: t, intervals: 60, perInterval: 150, wait: .milliseconds(1))
        #expect(a.status().limit == 100)
    }

    @Test func aCalmWithNoTrafficGrowsTheLimitBackAsIfEveryIntervalHadBeenSeen() {
        var a = Admission(maxQueue: 1000, maxBatchSize: 8, target: .milliseconds(20), now: start)
        let t = backlogged(&a, from: 0, intervals: 6, perInterval: 15_000, wait: .milliseconds(400))
        #expect(a.status().limit == 16)  // 1000 halved six times
        // The workers found the queue empty, then nothing happened for 10 s: one late look.
        a.ranEmpty(now: at(t + 10))
        _ = a.decide(queued: 0, count: 1, deadline: nil, now: at(t + 10_000))
        #expect(a.status().limit > 500)
    }

    @Test func theLimitGrowsBackOnlyToFourTargetsWorthAtTheDrainRate() {
        var a = Admission(maxQueue: 10_000, maxBatchSize: 8, target: .milliseconds(20), now: start)
        // 100 items per 100 ms is 1000 items/s: four 20 ms targets' worth is 80 items.
        var t = backlogged(&a, from: 0, intervals: 1, perInterval: 100, wait: .milliseconds(100))
        #expect(a.status().limit == 80)
        t = backlogged(&a, from: t, intervals: 100, perInterval: 100, wait: .milliseconds(1))
        #expect(a.status().limit == 80)
        #expect(a.decide(queued: 80, count: 1, deadline: nil, now: at(t + 1)) == .queueDelay)
    }

    @Test func theDrainRateIsMeasuredOnlyWhileBacklogged() throws {
        var a = Admission(maxQueue: 100, maxBatchSize: 8, target: .milliseconds(20), now: start)
        // The queue ran empty in this interval: what was dispatched is the arrivals, not the capacity.
        a.dispatched(items: 10, leastWait: .zero, emptied: true, now: at(50))
        _ = a.decide(queued: 0, count: 1, deadline: nil, now: at(100))
        #expect(a.status().drainRate == nil)
        backlogged(&a, from: 100, intervals: 1, perInterval: 160, wait: .milliseconds(1))
        let rate = try #require(a.status().drainRate)
        #expect(abs(rate - 1600) < 1)
        // Smoothed: a second interval at 800/s moves it 30 % of the way.
        backlogged(&a, from: 200, intervals: 1, perInterval: 80, wait: .milliseconds(1))
        #expect(abs(try #require(a.status().drainRate) - 1360) < 1)
    }

    @Test func aRequestThatWouldMissItsDeadlineIsRefusedAtArrival() {
        var a = Admission(maxQueue: 10_000, maxBatchSize: 8, target: .milliseconds(1000), now: start)
        let t = backlogged(&a, from: 0, intervals: 1, perInterval: 100, wait: .milliseconds(1))  // 1000 items/s
        // 500 queued at 1000/s is 500 ms ahead: a 100 ms deadline cannot be met, a 2 s one can.
        #expect(a.decide(queued: 500, count: 1, deadline: at(t + 100), now: at(t)) == .deadline)
        #expect(a.decide(queued: 500, count: 1, deadline: at(t + 2000), now: at(t)) == nil)
        #expect(a.decide(queued: 500, count: 1, deadline: nil, now: at(t)) == nil)
        #expect(a.status().refused == [.deadline: 1])
    }

    @Test func batcherRefusesWithTheReasonAndCountsIt() async throws {
        var batching = ModelConfiguration.Batching()
        batching.maxBatchSize = 2
        batching.maxQueue = 3
        let b = Batcher(modelName: "t", batching: batching, maxRetries: 0)
        let waiting = Task { try await b.submit([.json(Fixtures.json("1")), .json(Fixtures.json("2")), .json(Fixtures.json("3"))]) }
        #expect(await eventually { b.queuedItems == 3 })
        let early = try #require(b.earlyRefusal())
        #expect(early.code == .queueFull)
        #expect(early.message.contains("queue is full"))
        await #expect(throws: SidecarError.self) { try await b.submit([.json(Fixtures.json("4"))]) }
        #expect(b.admission.refused[.queueFull] == 2)
        waiting.cancel()
        b.close()
        #expect(b.earlyRefusal()?.code == .unavailable)
    }
}
