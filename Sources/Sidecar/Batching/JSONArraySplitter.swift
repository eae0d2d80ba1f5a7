import Foundation

/// Splits the top-level elements of a JSON array into byte ranges without decoding them.
///
/// A worker answers a batch with one JSON array (one `dumps` call in Python is far cheaper than one
/// per item); this turns it back into one value per item. It trusts that the input is valid JSON,
/// which the worker's encoder guarantees, and only tracks nesting and string literals.
enum JSONArraySplitter {
    struct Malformed: Error, CustomStringConvertible {
        var description: String { "worker output is not a JSON array" }
    }

    @inline(__always)
    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
    }

    /// The ranges (in `data`'s indices) of the array's elements, surrounding whitespace excluded.
    static func split(_ data: Data, expectedCount: Int = 0) throws -> [Range<Int>] {
        try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) -> [Range<Int>] in
            guard let bytes = raw.baseAddress?.assumingMemoryBound(to: UInt8.self) else { throw Malformed() }
            let n = raw.count
            let base = data.startIndex
            var ranges: [Range<Int>] = []
            ranges.reserveCapacity(expectedCount)
            var i = 0
            while i < n, isSpace(bytes[i]) { i += 1 }
            guard i < n, bytes[i] == UInt8(ascii: "[") else { throw Malformed() }
            i += 1
            while i < n, isSpace(bytes[i]) { i += 1 }
            if i < n, bytes[i] == UInt8(ascii: "]") { return ranges }
            while i < n {
                while i < n, isSpace(bytes[i]) { i += 1 }
                let start = i
                var depth = 0
                var inString = false
                while i < n {
                    let byte = bytes[i]
                    if inString {
                        if byte == UInt8(ascii: "\\") {
                            i += 2
                            continue
                        }
                        if byte == UInt8(ascii: "\"") { inString = false }
                    } else if byte == UInt8(ascii: "\"") {
                        inString = true
                    } else if byte == UInt8(ascii: "[") || byte == UInt8(ascii: "{") {
                        depth += 1
                    } else if byte == UInt8(ascii: "]") || byte == UInt8(ascii: "}") {
                        if depth == 0 { break }
                        depth -= 1
                    } else if byte == UInt8(ascii: ","), depth == 0 {
                        break
                    }
                    i += 1
                }
                guard i < n else { throw Malformed() }
                var end = i
                while end > start, isSpace(bytes[end - 1]) { end -= 1 }
                guard end > start else { throw Malformed() }
                ranges.append((base + start)..<(base + end))
                if bytes[i] == UInt8(ascii: "]") { return ranges }
                i += 1  // the comma
            }
            throw Malformed()
        }
    }
}
