import Foundation
import GRPCCore
import HTTPTypes
import SidecarOIPProtocol

/// A request's deadline from what the client sent: the gRPC deadline (`grpc-timeout`), the Open
/// Inference Protocol's `timeout` parameter (µs), or the `Sidecar-Timeout-Ms` HTTP header. The
/// earliest wins; none means the model's `timeouts.request_timeout_s`.
enum Deadlines {
    static let header = HTTPField.Name("Sidecar-Timeout-Ms")!

    /// The OIP `timeout` parameter: a non-negative number of microseconds. Values past a year are
    /// clamped to a year (``Duration/longestTimeout``): a client's number never overflows a clock.
    static func timeout(microseconds value: JSONElement?) throws -> Duration? {
        guard let value else { return nil }
        let timeout: Duration?
        switch value {
        case .integer(let n): timeout = .clampedTimeout(n, microsecondsPerUnit: 1)
        case .unsigned(let n): timeout = .clampedTimeout(Int64(clamping: n), microsecondsPerUnit: 1)
        case .number(let n): timeout = .clampedTimeout(n, microsecondsPerUnit: 1)
        default: timeout = nil
        }
        guard let timeout else { throw FrontError(.invalidArgument, "parameters.timeout must be a non-negative number of microseconds, got \(value.describe)") }
        return timeout
    }

    /// The gRPC request's `timeout` parameter (µs), from whichever typed field the client used: read
    /// as the JSON parameter is, so both bindings clamp and refuse alike.
    static func timeout(_ parameter: Inference_InferParameter?) throws -> Duration? {
        guard let parameter, let choice = parameter.parameterChoice else { return nil }
        switch choice {
        case .int64Param(let n): return try timeout(microseconds: .integer(n))
        case .uint64Param(let n): return try timeout(microseconds: .unsigned(n))
        case .doubleParam(let n): return try timeout(microseconds: .number(n))
        case .boolParam(let b): return try timeout(microseconds: .bool(b))
        case .stringParam(let text): return try timeout(microseconds: .string(text))
        }
    }

    /// The `Sidecar-Timeout-Ms` header.
    static func timeout(header value: String?) throws -> Duration? {
        guard let value else { return nil }
        guard let ms = Double(value.trimmingCharacters(in: .whitespaces)), let timeout = Duration.clampedTimeout(ms, microsecondsPerUnit: 1000) else {
            throw FrontError(.invalidArgument, "the Sidecar-Timeout-Ms header must be a non-negative number of milliseconds, got '\(value)'")
        }
        return timeout
    }

    /// `grpc-timeout`: an integer of at most 8 digits and a unit (H, M, S, m, u, n). Anything else
    /// is ignored here (the transport applies its own reading of the header).
    static func timeout(grpc metadata: Metadata) -> Duration? {
        guard let text = metadata[stringValues: "grpc-timeout"].first(where: { _ in true }), let unit = text.last else { return nil }
        let digits = text.dropLast()
        guard (1...8).contains(digits.count), digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber), let amount = Int64(digits) else { return nil }
        switch unit {
        case "H": return .clampedTimeout(amount, microsecondsPerUnit: 3_600_000_000)
        case "M": return .clampedTimeout(amount, microsecondsPerUnit: 60_000_000)
        case "S": return .clampedTimeout(amount, microsecondsPerUnit: 1_000_000)
        case "m": return .clampedTimeout(amount, microsecondsPerUnit: 1_000)
        case "u": return .clampedTimeout(amount, microsecondsPerUnit: 1)
        case "n": return .clampedTimeout(nanoseconds: amount)
        default: return nil
        }
    }

    /// The earliest of the given timeouts, as an instant counted from `start`.
    static func deadline(from start: ContinuousClock.Instant, _ timeouts: Duration?...) -> ContinuousClock.Instant? {
        timeouts.compactMap { $0 }.min().map { start.advanced(by: $0) }
    }
}
