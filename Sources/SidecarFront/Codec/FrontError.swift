import Foundation
import GRPCCore
import HTTPTypes
import Hummingbird
import NIOCore
import NIOFoundationCompat
import Sidecar

/// A request that failed, with the HTTP status and gRPC code both protocols answer it with. Every
/// error a front reports goes through here, so the two protocols never disagree.
struct FrontError: Error, CustomStringConvertible, HTTPResponseError {
    enum Code: Sendable {
        case invalidArgument, notFound, unavailable, queueFull, rateLimited, tooLarge, deadlineExceeded, unauthenticated, permissionDenied, conflict, internalError
    }

    var code: Code
    var message: String
    /// `Retry-After` in seconds: 1 for a full queue unless said otherwise; an open breaker's cool-down.
    var retryAfter: Int?

    init(_ code: Code, _ message: String, retryAfter: Int? = nil) {
        self.code = code
        self.message = message
        self.retryAfter = retryAfter ?? (code == .queueFull ? 1 : nil)
    }

    var description: String { message }

    var status: HTTPResponse.Status {
        switch code {
        case .invalidArgument: return .badRequest
        case .notFound: return .notFound
        case .unavailable: return .serviceUnavailable
        case .queueFull, .rateLimited: return .tooManyRequests
        case .tooLarge: return .contentTooLarge
        case .deadlineExceeded: return .gatewayTimeout
        case .unauthenticated: return .unauthorized
        case .permissionDenied: return .forbidden
        case .conflict: return .conflict
        case .internalError: return .internalServerError
        }
    }

    var rpcCode: RPCError.Code {
        switch code {
        case .invalidArgument: return .invalidArgument
        case .notFound: return .notFound
        case .unavailable: return .unavailable
        case .queueFull, .rateLimited, .tooLarge: return .resourceExhausted
        case .deadlineExceeded: return .deadlineExceeded
        case .unauthenticated: return .unauthenticated
        case .permissionDenied: return .permissionDenied
        case .conflict: return .alreadyExists
        case .internalError: return .internalError
        }
    }

    /// The gRPC status. Its message travels in a trailer, which clients cap (grpcio at 16 KiB, and a
    /// status over it reaches the client as RESOURCE_EXHAUSTED with the message lost): long messages,
    /// which echo what a client sent, are cut to 4 KiB.
    var rpcError: RPCError { RPCError(code: rpcCode, message: Self.truncated(message, bytes: 4096)) }

    static func truncated(_ text: String, bytes limit: Int) -> String {
        guard text.utf8.count > limit else { return text }
        var cut = String(decoding: text.utf8.prefix(limit), as: UTF8.self)
        if cut.last == "\u{FFFD}" { cut.removeLast() }  // half a character at the cut
        return cut + "… (\(text.utf8.count) bytes in all)"
    }

    /// The label used in metrics.
    var metricLabel: String {
        switch code {
        case .invalidArgument: return "invalid_argument"
        case .notFound: return "not_found"
        case .unavailable: return "unavailable"
        case .queueFull: return "queue_full"
        case .rateLimited: return "rate_limited"
        case .tooLarge: return "too_large"
        case .deadlineExceeded: return "deadline_exceeded"
        case .unauthenticated: return "unauthenticated"
        case .permissionDenied: return "permission_denied"
        case .conflict: return "conflict"
        case .internalError: return "internal"
        }
    }

    /// `{"error": "..."}`, as Open Inference Protocol clients expect.
    func response(from request: Request, context: some RequestContext) throws -> Response {
        Response(status: status, headers: responseHeaders, body: .init(byteBuffer: ByteBuffer(bytes: jsonBody)))
    }

    /// `{"error": "..."}`.
    var jsonBody: [UInt8] {
        var json = JSONWriter()
        json.raw("{\"error\":")
        json.string(message)
        json.raw("}")
        return Array(json.data)
    }

    /// The headers of the error's HTTP response (without its length).
    var responseHeaders: HTTPFields {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        if let retryAfter { headers[.retryAfter] = "\(retryAfter)" }
        if code == .unauthenticated { headers[.wwwAuthenticate] = "Bearer" }
        return headers
    }

    /// Maps any error from the host, a model or a decoder to what the client is told.
    static func from(_ error: any Error) -> FrontError {
        switch error {
        case let error as FrontError:
            return error
        case let error as RPCError:
            switch error.code {
            case .notFound: return FrontError(.notFound, error.message)
            case .invalidArgument: return FrontError(.invalidArgument, error.message)
            case .resourceExhausted: return FrontError(.queueFull, error.message)
            case .unavailable: return FrontError(.unavailable, error.message)
            case .deadlineExceeded: return FrontError(.deadlineExceeded, error.message)
            default: return FrontError(.internalError, error.message)
            }
        case let error as SidecarError:
            switch error.code {
            case .notFound: return FrontError(.notFound, error.message)
            case .invalidInput, .invalidModel, .invalidConfiguration: return FrontError(.invalidArgument, error.message)
            case .queueFull: return FrontError(.queueFull, error.message)
            case .unavailable:
                let breaker = (error.cause as? BreakerOpen).map { max(1, Int($0.retryAfter.inSeconds.rounded(.up))) }
                return FrontError(.unavailable, error.message, retryAfter: breaker)
            case .deadlineExceeded: return FrontError(.deadlineExceeded, error.message)
            case .conflict: return FrontError(.conflict, error.message)
            case .loadFailed, .environmentFailed:
                // The traceback or pip's output is what the operator needs to fix it.
                return FrontError(.internalError, error.detail.map { "\(error.message)\n\($0)" } ?? error.message)
            default: return FrontError(.internalError, error.message)
            }
        case let error as PredictionError:
            // An input the worker could not decode is the caller's error; anything else is the
            // model's. The traceback goes to the log (the worker forwarded it); the client gets the message.
            return FrontError(error.kind == .invalidInput ? .invalidArgument : .internalError, "\(error.type): \(error.message)")
        case let error as DecodingError:
            return FrontError(.invalidArgument, "malformed request: \(describe(error))")
        case is CancellationError:
            return FrontError(.unavailable, "the request was cancelled")
        default:
            return FrontError(.internalError, "\(error)")
        }
    }

    /// A DecodingError in one line, naming the field.
    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let parts = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return parts.isEmpty ? "the body" : String(parts.drop(while: { $0 == "." }))
        }
        switch error {
        case .keyNotFound(let key, let context):
            let base = path(context)
            return "missing field '\(key.stringValue)'" + (base == "the body" ? "" : " in \(base)")
        case .typeMismatch(let type, let context): return "'\(path(context))' must be \(typeName(type))"
        case .valueNotFound(let type, let context): return "'\(path(context))' must be \(typeName(type)), got null"
        case .dataCorrupted(let context):
            return context.codingPath.isEmpty ? "the body is not valid JSON" : "'\(path(context))': \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    private static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Int.Type, is Int64.Type: return "an integer"
        case is [Int].Type: return "a list of integers"
        case is Array<Any>.Type: return "a list"
        case is Bool.Type: return "a boolean"
        default: return "\(type)".contains("Array") ? "a list" : "an object"
        }
    }
}
