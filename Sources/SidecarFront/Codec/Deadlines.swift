import Foundation
import GRPCCore
import HTTPTypes
import SidecarOIPProtocol

/// A request's deadline from what the client sent: the gRPC deadline (`grpc-timeout`), the Open
/// Inference Protocol's `timeout` parameter (µs), or the `Sidecar-Timeout-Ms` HTTP header. The
/// earliest wins; none means the model's `timeouts.request_timeout_s`.
enum Deadlines {
    static let header = HTTPField.Name("Sidecar-Timeout-Ms")!

    /// The OIP `timeout` parameter: a non-negative number of microseconds.
    static func timeout(microseconds value: JSONElement?) throws -> Duration? {
        guard let value else { return nil }
        switch value {
        case .integer(let n) where n >= 0: return .microseconds(n)
        case .unsigned(let n): return .microseconds(Int64(clamping: n))
        case .number(let n) where n >= 0 && n.isFinite: return .microseconds(Int64(n))
        default: throw FrontError(.invalidArgument, "parameters.timeout must be a non-negative number of microseconds")
        }
    }

    /// The gRPC request's `timeout` parameter (µs), from whichever typed field the client used.
    static func timeout(_ parameter: Inference_InferParameter?) throws -> Duration? {
        guard let parameter, let choice = parameter.parameterChoice else { return nil }
        switch choice {
        case .int64Param(let n) where n >= 0: return .microseconds(n)
        case .uint64Param(let n): return .microseconds(Int64(clamping: n))
        case .doubleParam(let n) where n >= 0 && n.isFinite: return .microseconds(Int64(n))
        default: throw FrontError(.invalidArgument, "parameters.timeout must be a non-negative number of microseconds")
        }
    }

    /// The `Sidecar-Timeout-Ms` header.
    static func timeout(header value: String?) throws -> Duration? {
        guard let value else { return nil }
        guard let ms = Double(value.trimmingCharacters(in: .whitespaces)), ms >= 0, ms.isFinite else {
            throw FrontError(.invalidArgument, "the Sidecar-Timeout-Ms header must be a non-negative number of milliseconds, got '\(value)'")
        }
        return .microseconds(Int64(ms * 1000))
    }

    /// `grpc-timeout`: an integer of at most 8 digits and a unit (H, M, S, m, u, n).
    static func timeout(grpc metadata: Metadata) -> Duration? {
        guard let text = metadata[stringValues: "grpc-timeout"].first(where: { _ in true }), let unit = text.last,
              let amount = Int64(text.dropLast()), amount >= 0
        else { return nil }
        switch unit {
        case "H": return .seconds(amount * 3600)
        case "M": return .seconds(amount * 60)
        case "S": return .seconds(amount)
        case "m": return .milliseconds(amount)
        case "u": return .microseconds(amount)
        case "n": return .nanoseconds(amount)
        default: return nil
        }
    }

    /// The earliest of the given timeouts, as an instant counted from `start`.
    static func deadline(from start: ContinuousClock.Instant, _ timeouts: Duration?...) -> ContinuousClock.Instant? {
        timeouts.compactMap { $0 }.min().map { start.advanced(by: $0) }
    }
}
