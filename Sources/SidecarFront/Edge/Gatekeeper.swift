import Foundation
import Logging
import Metrics
import Sidecar
import Synchronization

/// API keys and rate limits, asked by every inference front (HTTP middleware, the early refusal
/// handler, the gRPC service and its interceptor) before a request goes further.
///
/// With no keys file every request is anonymous and only the models' rate limits apply.
final class Gatekeeper: Sendable {
    let keysFile: String?
    let open: Set<EndpointCategory>
    private let keys: Mutex<[APIKey]>
    private let modelRates: [String: RateLimit]
    private let buckets = Mutex<[String: TokenBucket]>([:])
    private let refusedAuth: [String: Counter]

    init(configuration: EdgeConfiguration) throws {
        keysFile = configuration.keysFile
        open = configuration.open
        keys = Mutex(try configuration.keysFile.map(APIKeys.read(file:)) ?? [])
        modelRates = configuration.modelRates
        refusedAuth = Dictionary(uniqueKeysWithValues: ["missing", "wrong", "forbidden"].map {
            ($0, Counter(label: "sidecar_auth_refused_total", dimensions: [("reason", $0)]))
        })
    }

    /// Whether anything is checked at all (the fronts skip the gate otherwise).
    var isActive: Bool { keysFile != nil || !modelRates.isEmpty }
    var requiresKeys: Bool { keysFile != nil }

    /// Reads the keys file again (SIGHUP). A file that cannot be read keeps the old keys.
    func reload(logger: Logger) {
        guard let keysFile else { return }
        do {
            let fresh = try APIKeys.read(file: keysFile)
            keys.withLock { $0 = fresh }
            logger.info("reloaded \(fresh.count) API key(s) from \(keysFile)")
        } catch {
            logger.error("kept the old API keys: \(error)")
        }
    }

    /// The key a request carries (`Authorization: Bearer KEY` or `x-api-key: KEY`), checked.
    /// Returns nil without keys configured; throws 401 for a missing or unknown key (counted,
    /// unless `counting` is false: a look that the request's handler will repeat).
    func authenticate(_ header: (String) -> String?, counting: Bool = true) throws -> APIKey? {
        guard requiresKeys else { return nil }
        let presented: String?
        if let bearer = header("authorization"), bearer.count > 7, bearer.prefix(7).lowercased() == "bearer " {
            presented = String(bearer.dropFirst(7)).trimmingCharacters(in: .whitespaces)
        } else {
            presented = header("x-api-key")
        }
        guard let presented, !presented.isEmpty else {
            if counting { refusedAuth["missing"]?.increment() }
            throw FrontError(.unauthenticated, "this endpoint needs an API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        }
        guard let key = APIKeys.match(presented, in: keys.withLock({ $0 })) else {
            if counting { refusedAuth["wrong"]?.increment() }
            throw FrontError(.unauthenticated, "the API key is not valid (it matches none in auth.keys_file)")
        }
        return key
    }

    /// Whether `category` needs a key, and if so that the request has a valid one.
    func check(_ category: EndpointCategory, _ header: (String) -> String?) throws {
        guard requiresKeys, !open.contains(category) else { return }
        _ = try authenticate(header)
    }

    /// Whether `key` may call `model` now: its permission (403) and the key's and the model's
    /// rate limits (429 with Retry-After). `known`: the model is loaded (else its name, which a
    /// client chose, stays out of the metrics).
    func admit(_ key: APIKey?, model: String, known: Bool) throws {
        if let key, let allowed = key.models, !allowed.contains(model) {
            refusedAuth["forbidden"]?.increment()
            throw FrontError(.permissionDenied, "the API key '\(key.name)' may not call model '\(model)' (its models in auth.keys_file: \(allowed.sorted().joined(separator: ", ")))")
        }
        let keyLimit = key?.limit
        let modelLimit = modelRates[model]
        guard keyLimit != nil || modelLimit != nil else { return }
        let now = ContinuousClock.now
        // Both buckets are checked before either is drawn from, so a refusal costs neither.
        let refusal: (who: String, wait: Double, limit: RateLimit)? = buckets.withLock { buckets in
            var checks: [(String, String, RateLimit)] = []
            if let key, let keyLimit { checks.append(("key:" + key.name, key.name, keyLimit)) }
            if let modelLimit { checks.append(("model:" + model, "_model", modelLimit)) }
            var refilled: [(id: String, bucket: TokenBucket)] = []
            for (id, who, limit) in checks {
                var bucket = buckets[id] ?? TokenBucket(limit: limit, now: now)
                bucket.refill(now: now, limit: limit)
                buckets[id] = bucket
                if bucket.tokens < 1 { return (who, bucket.wait(limit: limit), limit) }
                refilled.append((id, bucket))
            }
            for var entry in refilled {
                entry.bucket.tokens -= 1
                buckets[entry.id] = entry.bucket
            }
            return nil
        }
        guard let refusal else { return }
        Counter(label: "sidecar_rate_limited_total", dimensions: [("key", refusal.who), ("model", known ? model : FrontMetrics.unknownModel)]).increment()
        let seconds = max(1, Int(refusal.wait.rounded(.up)))
        let whose = refusal.who == "_model" ? "model '\(model)' (rate_limits)" : "the API key '\(refusal.who)'"
        throw FrontError(
            .rateLimited,
            "\(whose) is over its rate of \(Self.format(refusal.limit.rate)) requests/s (burst \(Self.format(refusal.limit.burst))); retry after \(seconds) s",
            retryAfter: seconds)
    }

    private static func format(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(format: "%.2f", value)
    }
}

/// A token bucket: `limit.burst` tokens at most, refilled at `limit.rate` per second.
struct TokenBucket: Sendable {
    var tokens: Double
    var updated: ContinuousClock.Instant

    init(limit: RateLimit, now: ContinuousClock.Instant) {
        tokens = limit.burst
        updated = now
    }

    mutating func refill(now: ContinuousClock.Instant, limit: RateLimit) {
        tokens = min(limit.burst, tokens + (now - updated).inSeconds * limit.rate)
        updated = now
    }

    /// Seconds until the next token.
    func wait(limit: RateLimit) -> Double { max(0, 1 - tokens) / limit.rate }
}
