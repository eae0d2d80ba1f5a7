import Crypto
import Foundation
import Sidecar
import Yams

/// One API key, as its file holds it: a name (for metrics and logs), the SHA-256 of the key (the
/// key itself is never stored), the models it may call, and its own rate limit.
struct APIKey: Sendable, Equatable {
    var name: String
    var sha256: [UInt8]
    /// nil: every model.
    var models: Set<String>?
    var limit: RateLimit?

    func allows(_ model: String) -> Bool { models?.contains(model) ?? true }
}

/// The keys file (`auth.keys_file`):
///
/// ```yaml
/// keys:
///   - name: alice
///     sha256: 9f86d081...          # sha256 of the key, hex (sidecar keys new prints it)
///     models: [iris]               # optional; default every model
///     rate: 50                     # optional requests/s, with burst
///     burst: 10
/// ```
enum APIKeys {
    static func read(file: String) throws -> [APIKey] {
        func fail(_ message: String) -> SidecarError { SidecarError(.invalidConfiguration, "auth.keys_file \(file): \(message)") }
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { throw fail("cannot read it") }
        let root: Yams.Node?
        do { root = try Yams.compose(yaml: text) } catch { throw fail("not valid YAML: \(error)") }
        // `keys: [...]`, or the list alone (what `sidecar keys new >> FILE` makes of an empty file).
        let entries = root.flatMap { $0.mapping?["keys"] ?? ($0.sequence != nil ? $0 : nil) }
        guard let entries, case .sequence(let list) = entries else {
            throw fail("must be a mapping with 'keys:', a list of {name, sha256, models, rate, burst}")
        }
        var keys: [APIKey] = []
        for (index, entry) in list.enumerated() {
            guard let fields = entry.mapping else { throw fail("keys[\(index)] must be a mapping with name and sha256") }
            var key = APIKey(name: "", sha256: [])
            var rate: Double?
            var burst: Double?
            for (k, v) in fields {
                let field = k.string ?? "?"
                switch field {
                case "name":
                    guard let name = v.string, ModelConfiguration.isValidName(name) else { throw fail("keys[\(index)].name must be letters, digits, '-', '_' or '.'") }
                    key.name = name
                case "sha256":
                    guard let hex = v.string?.lowercased(), let digest = Self.bytes(hex: hex), digest.count == 32 else {
                        throw fail("keys[\(index)].sha256 must be 64 hex digits (the SHA-256 of the key: sidecar keys new prints one)")
                    }
                    key.sha256 = digest
                case "models":
                    guard case .sequence(let names) = v else { throw fail("keys[\(index)].models must be a list of model names") }
                    key.models = Set(try names.map { node in
                        guard let name = node.string else { throw fail("keys[\(index)].models must be a list of model names") }
                        return name
                    })
                case "rate", "burst":
                    let least = field == "rate" ? RateLimit.slowest : 1
                    guard let value = v.float, value.isFinite, value >= least, value <= 1e9 else { throw fail("keys[\(index)].\(field) must be a number from \(least) to 1e9") }
                    if field == "rate" { rate = value } else { burst = value }
                default:
                    throw fail("unknown key 'keys[\(index)].\(field)'; expected one of: name, sha256, models, rate, burst")
                }
            }
            guard !key.name.isEmpty, !key.sha256.isEmpty else { throw fail("keys[\(index)] needs name and sha256") }
            guard !keys.contains(where: { $0.name == key.name }) else { throw fail("the name '\(key.name)' appears twice") }
            if let rate { key.limit = RateLimit(rate: rate, burst: burst) } else if burst != nil { throw fail("keys[\(index)].burst needs rate") }
            keys.append(key)
        }
        return keys
    }

    /// The key among `keys` whose hash is `presented`'s. Every stored hash is compared in full,
    /// in constant time, so the time taken says nothing about which key (or how much of one) matched.
    static func match(_ presented: String, in keys: [APIKey]) -> APIKey? {
        let digest = Array(SHA256.hash(data: Data(presented.utf8)))
        var found: APIKey?
        for key in keys {
            var difference: UInt8 = 0
            for (a, b) in zip(digest, key.sha256) { difference |= a ^ b }
            if difference == 0, key.sha256.count == digest.count { found = key }
        }
        return found
    }

    static func hex(_ bytes: some Sequence<UInt8>) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    static func bytes(hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let byte = UInt8(String(decoding: digits[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(byte)
        }
        return bytes
    }
}
