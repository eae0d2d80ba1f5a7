import Foundation
import Logging
import Metrics
import Synchronization

/// Why a request was answered by a model's fallback instead of the model.
public enum FallbackReason: String, Sendable, Hashable, CaseIterable {
    /// The model is FAILED, stopped, or its workers could not answer.
    case unavailable
    /// Admission refused the request (the queue is full or at its adaptive limit).
    case queueFull = "queue_full"
    /// The latency budget (`after_ms`) or the request's deadline passed first.
    case timeout
    /// The handler raised for the item.
    case error
    /// The circuit breaker is open.
    case breakerOpen = "breaker_open"

    /// What `fallback.on` may list (an open breaker always goes to the fallback).
    public static let configurable: Set<FallbackReason> = [.unavailable, .queueFull, .timeout, .error]

    /// The reason an error from the primary is, or nil for one that is the caller's (a bad request)
    /// or nobody's (the caller went away).
    static func of(_ error: any Error) -> FallbackReason? {
        switch error {
        case let error as SidecarError:
            switch error.code {
            case .queueFull: return .queueFull
            case .unavailable: return .unavailable
            case .deadlineExceeded: return .timeout
            default: return nil
            }
        case let error as PredictionError:
            switch error.kind {
            case .invalidInput: return nil
            case .workerDied, .unavailable: return .unavailable
            default: return .error
            }
        default:
            return nil
        }
    }
}

/// A fallback answer: why, and who gave it (the fallback model's name, or `response`).
public struct FallbackUse: Sendable, Equatable {
    public var reason: FallbackReason
    public var source: String
}

/// An answer and whether it came from the fallback.
public struct Served<Value: Sendable>: Sendable {
    public var value: Value
    public var fallback: FallbackUse?
}

/// The circuit breaker as operators see it.
public struct BreakerStatus: Sendable, Equatable {
    public var state: String
    /// Requests and failures counted in the current window.
    public var requests: Int
    public var failures: Int
    /// How many times it has opened since the model loaded.
    public var opened: Int
    /// Until it lets probes through (open only).
    public var retryIn: Duration?
    /// When it last opened (nil: never).
    public var openedAt: Date?
}

/// A model's fallback and circuit breaker: what `Model.serve` consults around every request of the
/// fronts and the library API. Not consulted: the inbox and batch jobs, which retry through the
/// broker or the job's journal rather than answer with a stand-in.
final class ModelGuard: Sendable {
    let modelName: String
    let fallback: ModelConfiguration.Fallback?
    /// The fixed answer's tensors, for OIP requests (`response: {"outputs": [...]}`).
    let fixedTensors: [Tensor]?
    /// nil inside without `breaker:` (``withBreaker(_:)`` then does nothing).
    private let breaker: Mutex<CircuitBreaker?>
    private let hasBreaker: Bool
    /// Finds the fallback model by name (set by the host; a model does not hold its host).
    private let lookup = Mutex<(@Sendable (String) -> Model?)?>(nil)
    private let logger: Logger
    private let missingWarned = Atomic(false)
    private let fallbacks: [FallbackReason: Counter]
    private let breakerGauge: Gauge?

    init(configuration: ModelConfiguration, logger: Logger) {
        modelName = configuration.name
        fallback = configuration.fallback
        if case .response(let value)? = configuration.fallback?.target {
            fixedTensors = try? FixedTensors.parse(value)
        } else {
            fixedTensors = nil
        }
        breaker = Mutex(configuration.breaker.map { CircuitBreaker(settings: $0) })
        hasBreaker = configuration.breaker != nil
        self.logger = logger
        // Counted only for a model that has a fallback: the others would export rows of zeros.
        fallbacks = configuration.fallback == nil ? [:] : Dictionary(uniqueKeysWithValues: FallbackReason.allCases.map { reason in
            (reason, Counter(label: "sidecar_fallback_total", dimensions: [("model", configuration.name), ("reason", reason.rawValue)]))
        })
        breakerGauge = configuration.breaker.map { _ in Gauge(label: "sidecar_breaker_state", dimensions: [("model", configuration.name)]) }
        breakerGauge?.record(0)
    }

    func setLookup(_ find: @escaping @Sendable (String) -> Model?) { lookup.withLock { $0 = find } }

    var isActive: Bool { fallback != nil || hasBreaker }

    /// Whether a refusal for `reason` is answered by the fallback rather than sent to the caller.
    func covers(_ reason: FallbackReason) -> Bool {
        guard let fallback else { return false }
        return reason == .breakerOpen || fallback.on.contains(reason)
    }

    /// Runs `body` on the breaker under its lock (nil without one). The value is taken out while
    /// `body` runs, so its buckets are mutated in place rather than copied.
    private func withBreaker<Result>(_ body: (inout CircuitBreaker) -> Result) -> Result? {
        breaker.withLock { stored in
            guard var current = stored.take() else { return nil }
            defer { stored = current }
            return body(&current)
        }
    }

    var breakerStatus: BreakerStatus? {
        let now = ContinuousClock.now
        guard let looked = withBreaker({ b -> (status: BreakerStatus, transition: CircuitBreaker.Transition?) in
            let transition = b.advance(now: now)
            let (requests, failures) = b.window(now: now)
            let retryIn = b.state == .open ? b.openedAt.map { max(.zero, $0 + b.settings.coolDown - now) } : nil
            let openedAt = b.openedAt.map { Date().addingTimeInterval(-(now - $0).inSeconds) }
            return (BreakerStatus(state: b.state.rawValue, requests: requests, failures: failures, opened: b.opened, retryIn: retryIn, openedAt: openedAt), transition)
        }) else { return nil }
        report(looked.transition)
        return looked.status
    }

    /// The error a request gets at once when the breaker is open and nothing falls back: what the
    /// fronts check before reading a body, like admission's early refusal.
    func earlyRefusal() -> SidecarError? {
        guard hasBreaker, fallback == nil else { return nil }
        let now = ContinuousClock.now
        let retry: Duration?? = withBreaker { b in
            guard b.state == .open, let openedAt = b.openedAt, now < openedAt + b.settings.coolDown else { return nil }
            return openedAt + b.settings.coolDown - now
        }
        return (retry ?? nil).map(openError)
    }

    private func openError(_ retryAfter: Duration) -> SidecarError {
        SidecarError(
            .unavailable,
            "model '\(modelName)': the circuit breaker is open (too many of its recent requests failed); it tries the model again in \(max(1, Int(retryAfter.inSeconds.rounded(.up)))) s",
            cause: BreakerOpen(retryAfter: retryAfter))
    }

    /// Runs `primary` under the breaker and the latency budget; on a covered failure, `alternative`
    /// answers instead (given the fallback model, or nil for the fixed response). `failed` says
    /// whether a completed answer counts as a failure for the breaker (a handler error in it).
    func serve<Value: Sendable>(
        deadline: ContinuousClock.Instant?,
        primary: @escaping @Sendable () async throws -> Value,
        failed: (Value) -> Bool = { _ in false },
        alternative: (Model?) async throws -> Value?
    ) async throws -> Served<Value> {
        var probe: Int?
        if let decided = withBreaker({ $0.decide(now: .now) }) {
            report(decided.1)
            switch decided.0 {
            case .primary: break
            case .probe(let round): probe = round
            case .open(let retryAfter):
                if let answer = try await answer(.breakerOpen, alternative) { return answer }
                throw openError(retryAfter)
            }
        }
        do {
            let value: Value
            if let budget = fallback?.after {
                guard let answered = try await within(budget, primary) else {
                    record(.failure, probe: probe)
                    if let answer = try await answer(.timeout, alternative) { return answer }
                    throw SidecarError(.deadlineExceeded, "model '\(modelName)' did not answer within fallback.after_ms (\(budget))")
                }
                value = answered
            } else {
                value = try await primary()
            }
            record(failed(value) ? .failure : .success, probe: probe)
            return Served(value: value, fallback: nil)
        } catch {
            let reason = FallbackReason.of(error)
            // Overload is not failure, nor is a deadline the caller chose (any client could open
            // the breaker for everyone with tiny deadlines); the server's own timeouts are.
            let neutral = reason == nil || reason == .queueFull || (reason == .timeout && deadline != nil)
            record(neutral ? .neutral : .failure, probe: probe)
            if let reason, covers(reason), let answer = try await answer(reason, alternative) { return answer }
            throw error
        }
    }

    /// The deadline the fallback works to: the request's own, or, once that has passed (the
    /// reason it falls back), a second from now, so that the stand-in can still be given.
    static func fallbackDeadline(_ deadline: ContinuousClock.Instant?) -> ContinuousClock.Instant? {
        guard let deadline else { return nil }
        return max(deadline, .now + .seconds(1))
    }

    /// The fallback's answer for `reason`, or nil when there is none (no fallback, the model it
    /// names is gone, or the fixed response does not fit the request).
    func answer<Value: Sendable>(_ reason: FallbackReason, _ alternative: (Model?) async throws -> Value?) async throws -> Served<Value>? {
        guard let fallback else { return nil }
        let value: Value?
        let source: String
        switch fallback.target {
        case .model(let name):
            guard let model = lookup.withLock({ $0 })?(name) else {
                // Said once until it is back, not once per request.
                if !missingWarned.exchange(true, ordering: .relaxed) {
                    logger.warning("fallback model '\(name)' is not loaded; requests get the primary's error until it is")
                }
                return nil
            }
            missingWarned.store(false, ordering: .relaxed)
            value = try await alternative(model)
            source = name
        case .response:
            value = try await alternative(nil)
            source = "response"
        }
        guard let value else { return nil }
        fallbacks[reason]?.increment()
        return Served(value: value, fallback: FallbackUse(reason: reason, source: source))
    }

    func record(_ outcome: CircuitBreaker.Outcome, probe: Int?) {
        report(withBreaker { $0.record(outcome, probe: probe, now: .now) } ?? nil)
    }

    private func report(_ transition: CircuitBreaker.Transition?) {
        guard let transition else { return }
        breakerGauge?.record(transition.to == .closed ? 0 : transition.to == .halfOpen ? 1 : 2)
        let message: Logger.Message = "circuit breaker \(transition.from.rawValue) → \(transition.to.rawValue): \(transition.why)"
        if transition.to == .open { logger.warning(message) } else { logger.info(message) }
    }
}

/// The cause of an open breaker's error: how long until it tries the model again (the fronts'
/// `Retry-After`).
public struct BreakerOpen: Error, Sendable {
    public let retryAfter: Duration
}

/// A fixed fallback answer for tensor requests: `{"outputs": [{name, datatype, shape, data}]}`,
/// `data` flat or nested, as in an OIP JSON response.
enum FixedTensors {
    static func parse(_ value: JSONValue) throws -> [Tensor] {
        guard let root = try JSONSerialization.jsonObject(with: value.data, options: [.fragmentsAllowed]) as? [String: Any],
            let outputs = root["outputs"] as? [[String: Any]], !outputs.isEmpty
        else { throw SidecarError(.invalidModel, "fallback.response is not {\"outputs\": [...]}") }
        return try outputs.map { output in
            guard let name = output["name"] as? String, let typeName = output["datatype"] as? String,
                let datatype = TensorDataType(rawValue: typeName.uppercased()), let shape = output["shape"] as? [Int], let data = output["data"]
            else { throw SidecarError(.invalidModel, "fallback.response outputs need name, datatype, shape and data") }
            var flat: [Any] = []
            func flatten(_ element: Any) {
                if let list = element as? [Any] { list.forEach(flatten) } else { flat.append(element) }
            }
            flatten(data)
            let tensor = Tensor(name: name, datatype: datatype, shape: shape, data: try encode(flat, datatype))
            try tensor.validate()
            return tensor
        }
    }

    private static func encode(_ elements: [Any], _ datatype: TensorDataType) throws -> Data {
        func bad() -> SidecarError { SidecarError(.invalidModel, "fallback.response: data does not fit datatype \(datatype.rawValue)") }
        var data = Data()
        func put<T>(_ value: T) { withUnsafeBytes(of: value) { data.append(contentsOf: $0) } }
        if datatype == .bytes {
            return try Tensor.bytesData(elements.map { element in
                guard let text = element as? String else { throw bad() }
                return Data(text.utf8)
            })
        }
        for element in elements {
            guard let number = element as? NSNumber else { throw bad() }
            switch datatype {
            case .bool: put(UInt8(number.boolValue ? 1 : 0))
            case .int8: put(number.int8Value)
            case .int16: put(number.int16Value.littleEndian)
            case .int32: put(number.int32Value.littleEndian)
            case .int64: put(number.int64Value.littleEndian)
            case .uint8: put(number.uint8Value)
            case .uint16: put(number.uint16Value.littleEndian)
            case .uint32: put(number.uint32Value.littleEndian)
            case .uint64: put(number.uint64Value.littleEndian)
            case .fp32: put(number.floatValue.bitPattern.littleEndian)
            case .fp64: put(number.doubleValue.bitPattern.littleEndian)
            default: throw bad()
            }
        }
        return data
    }
}
