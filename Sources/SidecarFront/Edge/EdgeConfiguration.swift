import Foundation
import Sidecar
import Yams

/// What makes the server safe to put in front of traffic (`tls:`, `auth:`, `rate_limits:`,
/// `limits:` in the server's configuration file). TLS, keys and rate limits are off unless
/// configured; the connection limits are on with generous values.
public struct EdgeConfiguration: Sendable {
    public struct TLS: Sendable, Equatable {
        public var certFile: String
        public var keyFile: String
        /// Clients must present a certificate signed by this CA (mutual TLS).
        public var clientCAFile: String?
    }

    public var tls: TLS?
    /// API keys for inference (stored hashed; see ``APIKeys``).
    public var keysFile: String?
    /// What needs no key when keys are on.
    public var open: Set<EndpointCategory> = EndpointCategory.openByDefault
    /// Token buckets per model, with or without keys.
    public var modelRates: [String: RateLimit] = [:]
    /// Open connections per listener: at the cap the longest-idle one is closed for a new one.
    public var maxConnections = 4096
    /// An HTTP request's head and body must arrive in full within this from its first byte.
    public var requestTimeout: Duration = .seconds(30)
    /// An HTTP connection with no request in progress, or a gRPC connection with no stream, is
    /// closed after this.
    public var idleTimeout: Duration = .seconds(60)

    public init() {}

    static let topKeys = ["tls", "auth", "rate_limits", "limits"]

    /// Reads one of ``topKeys`` of the server's configuration file at `path` (relative file names
    /// are relative to `base`).
    mutating func read(_ key: String, _ node: Yams.Node, path: String, base: URL) throws {
        func fail(_ key: String, _ expected: String) -> SidecarError {
            SidecarError(.invalidConfiguration, "\(path): '\(key)' must be \(expected)")
        }
        func mapping(_ node: Yams.Node, _ key: String, _ allowed: [String]) throws -> [(String, Yams.Node)] {
            guard let mapping = node.mapping else { throw fail(key, "a mapping with: \(allowed.joined(separator: ", "))") }
            return try mapping.map { k, v in
                guard let name = k.string, allowed.contains(name) else {
                    throw SidecarError(.invalidConfiguration, "\(path): unknown key '\(key).\(k.string ?? "?")'; expected one of: \(allowed.joined(separator: ", "))")
                }
                return (name, v)
            }
        }
        func file(_ node: Yams.Node, _ key: String) throws -> String {
            guard let name = node.string, !name.isEmpty else { throw fail(key, "a file path") }
            return name.hasPrefix("/") ? name : base.appendingPathComponent(name).path
        }
        func seconds(_ node: Yams.Node, _ key: String) throws -> Duration {
            guard let value = node.float, let duration = Duration.clampedTimeout(value, microsecondsPerUnit: 1_000_000), value > 0 else {
                throw fail(key, "a positive number of seconds")
            }
            return duration
        }
        switch key {
        case "tls":
            var cert: String?
            var privateKey: String?
            var ca: String?
            for (k, v) in try mapping(node, key, ["cert_file", "key_file", "client_ca_file"]) {
                switch k {
                case "cert_file": cert = try file(v, "tls.cert_file")
                case "key_file": privateKey = try file(v, "tls.key_file")
                default: ca = try file(v, "tls.client_ca_file")
                }
            }
            guard let cert, let privateKey else { throw SidecarError(.invalidConfiguration, "\(path): 'tls' needs both cert_file and key_file") }
            tls = TLS(certFile: cert, keyFile: privateKey, clientCAFile: ca)
        case "auth":
            for (k, v) in try mapping(node, key, ["keys_file", "open"]) {
                if k == "keys_file" {
                    keysFile = try file(v, "auth.keys_file")
                } else {
                    let names = EndpointCategory.allCases.map(\.rawValue).joined(separator: ", ")
                    guard case .sequence(let seq) = v else { throw fail("auth.open", "a list of: \(names) (or [])") }
                    open = try Set(seq.map { element in
                        guard let category = element.string.flatMap(EndpointCategory.init(rawValue:)) else { throw fail("auth.open", "a list of: \(names) (or [])") }
                        return category
                    })
                }
            }
            guard keysFile != nil else { throw SidecarError(.invalidConfiguration, "\(path): 'auth' needs keys_file") }
        case "rate_limits":
            guard let byModel = node.mapping else { throw fail(key, "a mapping of model names to {rate, burst}") }
            for (name, limit) in byModel {
                guard let model = name.string, ModelConfiguration.isValidName(model) else { throw fail(key, "a mapping whose keys are model names") }
                modelRates[model] = try RateLimit.read(limit, key: "rate_limits.\(model)", path: path)
            }
        default:  // limits
            for (k, v) in try mapping(node, key, ["max_connections", "request_timeout_s", "idle_timeout_s"]) {
                switch k {
                case "max_connections":
                    guard let value = v.int, (1...1_000_000).contains(value) else { throw fail("limits.max_connections", "an integer from 1 to 1000000") }
                    maxConnections = value
                case "request_timeout_s": requestTimeout = try seconds(v, "limits.request_timeout_s")
                default: idleTimeout = try seconds(v, "limits.idle_timeout_s")
                }
            }
        }
    }
}

/// What an endpoint is, for `auth.open`.
public enum EndpointCategory: String, Sendable, CaseIterable {
    /// Liveness and readiness: `/v2/health/*`, `/health`, model ready, gRPC health.
    case health
    /// Server and model metadata, `/status`.
    case metadata
    /// `/metrics`.
    case metrics

    public static let openByDefault: Set<EndpointCategory> = [.health, .metadata, .metrics]
}

/// A token bucket's settings: `rate` requests per second, at most `burst` at once.
public struct RateLimit: Sendable, Equatable {
    public var rate: Double
    public var burst: Double

    /// The slowest rate (one request in 1000 s): slower ones mean nothing and overflow the waits.
    public static let slowest = 0.001

    public init(rate: Double, burst: Double? = nil) {
        self.rate = rate
        self.burst = burst ?? max(1, rate)
    }

    /// `{rate, burst}` at `key`.
    static func read(_ node: Yams.Node, key: String, path: String) throws -> RateLimit {
        guard let mapping = node.mapping else { throw SidecarError(.invalidConfiguration, "\(path): '\(key)' must be a mapping with rate (requests per second) and burst") }
        var rate: Double?
        var burst: Double?
        for (k, v) in mapping {
            guard let name = k.string, ["rate", "burst"].contains(name) else {
                throw SidecarError(.invalidConfiguration, "\(path): unknown key '\(key).\(k.string ?? "?")'; expected one of: rate, burst")
            }
            guard let value = v.float, value.isFinite, value >= RateLimit.slowest, value <= 1e9 else {
                throw SidecarError(.invalidConfiguration, "\(path): '\(key).\(name)' must be a number from \(RateLimit.slowest) to 1e9")
            }
            if name == "rate" { rate = value } else { burst = max(1, value) }
        }
        guard let rate else { throw SidecarError(.invalidConfiguration, "\(path): '\(key)' needs rate (requests per second)") }
        return RateLimit(rate: rate, burst: burst)
    }
}
