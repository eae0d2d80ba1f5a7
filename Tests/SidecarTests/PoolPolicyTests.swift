import Testing
@testable import Sidecar

/// The pool-wide decisions beside the slot policy: the crash-loop breaker through time (instants
/// made up, no waiting) and the slots a resize adds or retires.
@Suite struct PoolPolicyTests {
    let start = ContinuousClock.now

    func breaker(_ maxFailures: Int = 3, window: Duration = .seconds(60)) -> CrashLoopBreaker {
        CrashLoopBreaker(ModelConfiguration.RestartPolicy(maxFailures: maxFailures, window: window))
    }

    /// Records failures at `offsets` after `start`; what each `record` returned.
    func trips(_ breaker: inout CrashLoopBreaker, at offsets: [Duration]) -> [Bool] {
        offsets.map { breaker.record(at: start + $0) }
    }

    @Test func tripsAtMaxFailuresWithinTheWindow() {
        var breaker = breaker()
        let tripped = trips(&breaker, at: [.zero, .seconds(10), .seconds(20)])
        #expect(tripped == [false, false, true])
        #expect(breaker.tripped)
    }

    @Test func failuresOlderThanTheWindowAreForgotten() {
        var breaker = breaker()
        // At 61 s the first is out of the window: two in it, not three.
        let tripped = trips(&breaker, at: [.zero, .seconds(30), .seconds(61)])
        #expect(tripped == [false, false, false])
        #expect(breaker.recent.count == 2)
        let fourth = trips(&breaker, at: [.seconds(62)])
        #expect(fourth == [true])
    }

    @Test func trippedOnceOnly() {
        var breaker = breaker(1)
        let tripped = trips(&breaker, at: [.zero, .seconds(1)])
        #expect(tripped == [true, false], "the model is failed once, not per later failure")
    }

    @Test func growingFillsTheLowestFreeSlots() {
        #expect(ResizePlan(slots: [0, 1], target: 4) == ResizePlan(added: [2, 3]))
        // Slot 1 is still draining out of a scale-down: the new one takes a free index.
        #expect(ResizePlan(slots: [0, 2], target: 4) == ResizePlan(added: [1, 3]))
    }

    @Test func shrinkingRetiresTheHighestSlots() {
        #expect(ResizePlan(slots: [0, 1, 2, 3], target: 1) == ResizePlan(retired: [1, 2, 3]))
        #expect(ResizePlan(slots: [0, 3, 5], target: 2) == ResizePlan(retired: [5]))
    }

    @Test func theSameSizeChangesNothing() {
        #expect(ResizePlan(slots: [0, 1], target: 2) == ResizePlan())
    }
}
