import Foundation
import Testing
@testable import Sidecar

/// The circuit breaker on its own (time passed in) and the fallback configuration it comes with.
@Suite struct CircuitBreakerTests {
    let start = ContinuousClock.now
    func at(_ ms: Int) -> ContinuousClock.Instant { start.advanced(by: .milliseconds(ms)) }

    func settings(rate: Double = 0.5, min: Int = 4, window: Int = 10, coolDown: Int = 2, probes: Int = 2) -> ModelConfiguration.Breaker {
        var s = ModelConfiguration.Breaker()
        s.failureRate = rate
        s.minRequests = min
        s.window = .seconds(window)
        s.coolDown = .seconds(coolDown)
        s.probes = probes
        return s
    }

    @Test func opensAtTheFailureRateOnlyOnceEnoughRequestsWereSeen() {
        var b = CircuitBreaker(settings: settings(), now: start)
        #expect(b.record(.failure, now: at(1)) == nil)
        #expect(b.record(.failure, now: at(2)) == nil)
        #expect(b.record(.failure, now: at(3)) == nil)  // 3 of 3: too few to judge
        #expect(b.state == .closed)
        let t = b.record(.success, now: at(4))  // 3 of 4 failed
        #expect(t?.to == .open)
        #expect(b.state == .open)
        #expect(b.decide(now: at(5)).0 == .open(retryAfter: .milliseconds(1999)))
    }

    @Test func successesKeepItClosedAndNeutralOutcomesDoNotCount() {
        var b = CircuitBreaker(settings: settings(), now: start)
        for i in 0..<10 { _ = b.record(i % 4 == 0 ? .failure : .success, now: at(i)) }  // 3 of 10, never half
        for i in 10..<100 { _ = b.record(.neutral, now: at(i)) }
        #expect(b.state == .closed)
        #expect(b.window(now: at(100)) == (10, 3))
    }

    @Test func oldOutcomesLeaveTheWindow() {
        var b = CircuitBreaker(settings: settings(min: 2), now: start)
        _ = b.record(.failure, now: at(0))
        // 11 s later the failure is out of the 10 s window: one more is 1 of 1, not 2 of 2.
        #expect(b.window(now: at(11_000)) == (0, 0))
        #expect(b.record(.failure, now: at(11_000)) == nil)
        #expect(b.state == .closed)
    }

    @Test func halfOpenLetsTheProbesThroughAndClosesWhenAllSucceed() {
        var b = CircuitBreaker(settings: settings(min: 1, probes: 2), now: start)
        _ = b.record(.failure, now: at(0))
        #expect(b.state == .open)
        #expect(b.decide(now: at(1999)).0 == .open(retryAfter: .milliseconds(1)))
        let (first, transition) = b.decide(now: at(2000))
        #expect(first == .probe(round: 1))
        #expect(transition?.to == .halfOpen)
        #expect(b.decide(now: at(2001)).0 == .probe(round: 1))
        #expect(b.decide(now: at(2002)).0 == .open(retryAfter: .seconds(1)))  // both probes out
        // A probe that said nothing (the caller went away) frees its place.
        #expect(b.record(.neutral, probe: 1, now: at(2003)) == nil)
        #expect(b.decide(now: at(2004)).0 == .probe(round: 1))
        #expect(b.record(.success, probe: 1, now: at(2005)) == nil)
        #expect(b.record(.success, probe: 1, now: at(2006))?.to == .closed)
        #expect(b.state == .closed)
        #expect(b.window(now: at(2007)) == (0, 0))  // a fresh window
    }

    @Test func aFailedProbeOpensItAgain() {
        var b = CircuitBreaker(settings: settings(min: 1, probes: 3), now: start)
        _ = b.record(.failure, now: at(0))
        _ = b.decide(now: at(2000))
        #expect(b.record(.failure, probe: 1, now: at(2001))?.to == .open)
        #expect(b.opened == 2)
        #expect(b.decide(now: at(3000)).0 == .open(retryAfter: .milliseconds(1001)))
        // A probe of round 1 that answers in round 2 counts in neither.
        #expect(b.decide(now: at(4001)).0 == .probe(round: 2))
        #expect(b.record(.success, probe: 1, now: at(4002)) == nil)
        #expect(b.record(.success, probe: 1, now: at(4003)) == nil)
        #expect(b.record(.success, probe: 1, now: at(4004)) == nil)
        #expect(b.state == .halfOpen)
    }

    @Test func fallbackAndBreakerKeysAreReadAndCheckedWithTheirNames() throws {
        let config = try ModelConfiguration.parse(
            yaml: """
                fallback:
                  model: popular
                  on: [error]
                  after_ms: 50
                breaker: {failure_rate: 0.25, min_requests: 8, window_s: 30, cool_down_s: 1, probes: 1}
                """, file: "m/sidecar.yaml", defaultName: "m")
        #expect(config.fallback?.target == .model("popular"))
        #expect(config.fallback?.on == [.error, .timeout])  // a budget implies timeout
        #expect(config.fallback?.after == .milliseconds(50))
        #expect(config.breaker?.failureRate == 0.25)
        #expect(config.breaker?.minRequests == 8)
        let fixed = try ModelConfiguration.parse(yaml: "fallback: {response: [1, 2]}", file: "m/sidecar.yaml", defaultName: "m")
        #expect(fixed.fallback?.target == .response(try JSONValue(json: "[1,2]")))
        #expect(fixed.fallback?.on == FallbackReason.configurable)
        for (yaml, named) in [
            ("fallback: {}", "'fallback' needs 'model'"),
            ("fallback: {model: a, response: 1}", "either 'model' or 'response'"),
            ("fallback: {model: a, on: [sometimes]}", "'fallback.on'"),
            ("fallback: {model: a, when: x}", "unknown key 'fallback.when'"),
            ("breaker: {failure_rate: 2}", "'breaker.failure_rate'"),
            ("breaker: {probes: 0}", "'breaker.probes'"),
        ] {
            #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: yaml, file: "m/sidecar.yaml", defaultName: "m") }
            do { _ = try ModelConfiguration.parse(yaml: yaml, file: "m/sidecar.yaml", defaultName: "m") } catch let error as SidecarError {
                #expect(error.message.contains(named), "\(error.message)")
            }
        }
    }

    @Test func aFixedTensorResponseIsEncodedAsTheProtocolSaysAndBadOnesAreRefused() throws {
        let tensors = try FixedTensors.parse(try JSONValue(json: #"{"outputs":[{"name":"y","datatype":"FP32","shape":[1,2],"data":[[1.5,2]]},{"name":"label","datatype":"BYTES","shape":[1],"data":["top"]}]}"#))
        #expect(tensors.count == 2)
        #expect(tensors[0].data == Data([Float(1.5), Float(2)].flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }))
        #expect(tensors[1].data == Data([3, 0, 0, 0] + Array("top".utf8)))
        #expect(throws: (any Error).self) { try FixedTensors.parse(try JSONValue(json: "[1,2]")) }
        #expect(throws: (any Error).self) { try FixedTensors.parse(try JSONValue(json: #"{"outputs":[{"name":"y","datatype":"FP32","shape":[3],"data":[1]}]}"#)) }
    }

    @Test func errorsMapToTheReasonsTheFallbackCovers() {
        #expect(FallbackReason.of(SidecarError(.queueFull, "x")) == .queueFull)
        #expect(FallbackReason.of(SidecarError(.unavailable, "x")) == .unavailable)
        #expect(FallbackReason.of(SidecarError(.deadlineExceeded, "x")) == .timeout)
        #expect(FallbackReason.of(SidecarError(.invalidInput, "x")) == nil)
        #expect(FallbackReason.of(PredictionError(kind: .handlerError, type: "E", message: "m")) == .error)
        #expect(FallbackReason.of(PredictionError(kind: .workerDied, type: "E", message: "m")) == .unavailable)
        #expect(FallbackReason.of(PredictionError(kind: .invalidInput, type: "E", message: "m")) == nil)
        #expect(FallbackReason.of(CancellationError()) == nil)
    }
}
