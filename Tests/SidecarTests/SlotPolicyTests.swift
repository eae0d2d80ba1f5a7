import Testing
@testable import Sidecar

/// The supervision policy of one slot, event by event, without Python or a clock. The real-process
/// tests (SupervisionTests) check the same behaviour end to end.
@Suite struct SlotPolicyTests {
    let serving = SlotPolicy.Pool(stopping: false, awaitingFirstReadiness: false)
    let starting = SlotPolicy.Pool(stopping: false, awaitingFirstReadiness: true)
    let stopping = SlotPolicy.Pool(stopping: true, awaitingFirstReadiness: false)

    func policy() -> SlotPolicy { SlotPolicy(maxBackoff: .seconds(10), jitter: { 1.0 }) }

    func exit(ready: Bool = true, retired: Bool = false, outside: Bool = false, unanswered: Int = 0) -> SlotPolicy.Exit {
        SlotPolicy.Exit(becameReady: ready, retired: retired, killedFromOutside: outside, unanswered: unanswered, reason: "exited with status 1")
    }

    @Test func startsAWorkerAndReportsItReady() {
        var slot = policy()
        #expect(slot.handle(.begin, pool: starting) == [.start(generation: 0), .show(generation: 0)])
        #expect(slot.handle(.ready(generation: 0), pool: starting) == [.slotReady])
        #expect(slot.current == 0)
    }

    @Test func nothingStartsWhenThePoolIsAlreadyStopping() {
        var slot = policy()
        #expect(slot.handle(.begin, pool: stopping) == [.finish])
        #expect(slot.handle(.restart, pool: stopping) == [], "a finished slot ignores late events")
    }

    @Test func aCrashWhileIdleCountsTowardTheBreakerAndRestartsAfterBackoff() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.ready(generation: 0), pool: serving)
        let actions = slot.handle(.exited(generation: 0, exit()), pool: serving)
        #expect(actions == [
            .show(generation: nil), .countRestart(message: "exited with status 1"),
            .log(.died(message: "exited with status 1", unanswered: 0)), .recordFailure,
            .scheduleRestart(after: .milliseconds(100)),
        ])
        #expect(slot.handle(.restart, pool: serving) == [.start(generation: 1), .show(generation: 1)])
    }

    @Test func aCrashWhileRunningABatchIsTheBatchsDoingNotTheModels() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        let actions = slot.handle(.exited(generation: 0, exit(unanswered: 1)), pool: serving)
        #expect(!actions.contains(.recordFailure))
        #expect(actions.contains(.scheduleRestart(after: .milliseconds(100))))
    }

    @Test func aSIGKILLFromOutsideIsNotTheModelsFailure() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        #expect(!slot.handle(.exited(generation: 0, exit(outside: true)), pool: serving).contains(.recordFailure))
    }

    @Test func failedStartsBackOffExponentiallyUpToTheLimit() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        var delays: [Duration] = []
        for generation in 0..<9 {
            for case .scheduleRestart(let delay) in slot.handle(.exited(generation: generation, exit(ready: false)), pool: serving) {
                delays.append(delay)
            }
            _ = slot.handle(.restart, pool: serving)
        }
        #expect(delays.prefix(4) == [.milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(1600)])
        #expect(delays.last == .seconds(10), "capped at max_backoff_s")
        // A worker that served resets the count.
        _ = slot.handle(.ready(generation: 9), pool: serving)
        #expect(slot.handle(.exited(generation: 9, exit(ready: true)), pool: serving).contains(.scheduleRestart(after: .milliseconds(100))))
    }

    @Test func aFirstStartThatFailsIsReportedNotRetried() {
        var slot = policy()
        _ = slot.handle(.begin, pool: starting)
        let actions = slot.handle(.exited(generation: 0, exit(ready: false)), pool: starting)
        #expect(actions.contains(.failFirstStart))
        #expect(!actions.contains { if case .scheduleRestart = $0 { return true } else { return false } })
        #expect(actions.last == .finish)
    }

    @Test func recyclingStartsTheSuccessorFirstAndRetiresTheOldOneOnlyOnceItIsReady() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.ready(generation: 0), pool: serving)
        #expect(slot.handle(.recycle(generation: 0, reason: "max_requests"), pool: serving)
            == [.log(.recycling(reason: "max_requests")), .start(generation: 1)])
        #expect(slot.handle(.recycle(generation: 0, reason: "again"), pool: serving) == [], "one successor at a time")
        #expect(slot.current == 0, "the old worker serves until its successor is ready")
        #expect(slot.handle(.ready(generation: 1), pool: serving) == [.retireWorker(generation: 0), .handOver(from: 0, to: 1), .slotReady])
        #expect(slot.current == 1)
        // The old one drains and exits: its counts fold into the history, no restart.
        #expect(slot.handle(.exited(generation: 0, exit(retired: true)), pool: serving) == [.drained(generation: 0)])
    }

    @Test func aSuccessorThatFailsToStartLeavesTheCurrentWorkerServing() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.recycle(generation: 0, reason: "rss"), pool: serving)
        let actions = slot.handle(.exited(generation: 1, exit(ready: false)), pool: serving)
        #expect(actions == [.log(.successorFailed(reason: "exited with status 1")), .recordFailure])
        #expect(slot.current == 0 && slot.incoming == nil)
    }

    @Test func whenTheCurrentWorkerDiesDuringRecyclingTheSuccessorTakesOver() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.recycle(generation: 0, reason: "rss"), pool: serving)
        let actions = slot.handle(.exited(generation: 0, exit(unanswered: 1)), pool: serving)
        #expect(actions.last == .show(generation: 1))
        #expect(!actions.contains { if case .scheduleRestart = $0 { return true } else { return false } })
        #expect(slot.handle(.ready(generation: 1), pool: serving) == [.slotReady])
    }

    @Test func retiringDrainsEveryWorkerAndFinishesWhenTheLastExits() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.recycle(generation: 0, reason: "rss"), pool: serving)
        #expect(slot.handle(.retire, pool: serving) == [.retireWorker(generation: 0), .retireWorker(generation: 1)])
        #expect(slot.handle(.recycle(generation: 0, reason: "rss"), pool: serving) == [], "no successor for a leaving slot")
        #expect(slot.handle(.exited(generation: 1, exit(ready: false, retired: true)), pool: serving) == [.drained(generation: 1)])
        #expect(slot.handle(.exited(generation: 0, exit(retired: true)), pool: serving) == [.show(generation: nil), .finish])
        #expect(slot.finished)
    }

    @Test func stoppingRestartsNothingAndFinishesWithTheLastWorker() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.ready(generation: 0), pool: serving)
        #expect(slot.handle(.stop, pool: stopping) == [], "a ready worker drains the closed queue, then exits")
        #expect(slot.handle(.exited(generation: 0, exit()), pool: stopping) == [.show(generation: nil), .finish])
    }

    @Test func stoppingRetiresWorkersStillLoadingAtOnce() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        _ = slot.handle(.ready(generation: 0), pool: serving)
        _ = slot.handle(.recycle(generation: 0, reason: "rss"), pool: serving)
        // Worker 1, the successor, is loading: the stop does not wait for its load.
        #expect(slot.handle(.stop, pool: stopping) == [.retireWorker(generation: 1)])
        #expect(slot.handle(.exited(generation: 1, exit(ready: false, retired: true)), pool: stopping) == [])
        #expect(slot.handle(.exited(generation: 0, exit()), pool: stopping) == [.show(generation: nil), .finish])

        var loading = policy()
        _ = loading.handle(.begin, pool: starting)
        #expect(loading.handle(.stop, pool: stopping) == [.retireWorker(generation: 0)])
    }

    @Test func eventsOfUnknownWorkersAreIgnored() {
        var slot = policy()
        _ = slot.handle(.begin, pool: serving)
        #expect(slot.handle(.ready(generation: 7), pool: serving) == [])
        #expect(slot.handle(.exited(generation: 7, exit()), pool: serving) == [])
        #expect(slot.handle(.recycle(generation: 7, reason: "x"), pool: serving) == [])
        #expect(slot.handle(.restart, pool: serving) == [], "a restart while a worker serves starts nothing")
    }
}
