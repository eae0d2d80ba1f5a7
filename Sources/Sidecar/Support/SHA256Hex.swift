import Crypto
import Foundation

/// Lowercase hex of a SHA-256 digest: bundle hashes, environment keys, runtime hashes.
func hex(_ digest: SHA256.Digest) -> String {
    digest.map { String(format: "%02x", $0) }.joined()
}

/// Hex SHA-256 of the given parts, each length-prefixed so that ("ab", "c") and ("a", "bc") differ.
func sha256Hex(_ parts: [Data]) -> String {
    var hasher = SHA256()
    for part in parts {
        withUnsafeBytes(of: UInt64(part.count).littleEndian) { hasher.update(bufferPointer: $0) }
        hasher.update(data: part)
    }
    return hex(hasher.finalize())
}
