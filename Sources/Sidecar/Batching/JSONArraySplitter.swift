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

    static func split(_ data: Data) throws -> [Range<Int>] {
        try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) -> [Range<Int>] in
            let bytes = raw.bindMemory(to: UInt8.self)
            let base = data.startIndex
            var i = 0
            let n = bytes.count
            func skipSpace() { while i < n, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 } }
            skipSpace()
            guard i < n, bytes[i] == UInt8(ascii: "[") else { throw Malformed() }
            i += 1
            var ranges: [Range<Int>] = []
            skipSpace()
            if i < n, bytes[i] == UInt8(ascii: "]") { return ranges }
            while i < n {
                skipSpace()
                let start = i
                var depth = 0
                var inString = false
                scan: while i < n {
                    let byte = bytes[i]
                    if inString {
                        if byte == UInt8(ascii: "\\") { i += 2; continue }
                        if byte == UInt8(ascii: "\"") { inString = false }
                    } else {
                        switch byte {
                        case UInt8(ascii: "\""): inString = true
                        case UInt8(ascii: "["), UInt8(ascii: "{"): depth += 1
                        case UInt8(ascii: "]"), UInt8(ascii: "}"):
                            if depth == 0 { break scan }
                            depth -= 1
                        case UInt8(ascii: ","):
                            if depth == 0 { break scan }
                        default: break
                        }
                    }
                    i += 1
                }
                guard i < n else { throw Malformed() }
                var end = i
                while end > start, bytes[end - 1] == 0x20 || bytes[end - 1] == 0x0A || bytes[end - 1] == 0x0D || bytes[end - 1] == 0x09 { end -= 1 }
                guard end > start else { throw Malformed() }
                ranges.append((base + start)..<(base + end))
                if bytes[i] == UInt8(ascii: "]") { return ranges }
                i += 1  // the comma
            }
            throw Malformed()
        }
    }
}
