import Foundation
import Subprocess

// MARK: - The tar stream

extension BundleArchive {
    /// One tar entry's header, with GNU long names and pax overrides applied.
    struct RawEntry {
        var name: String
        var linkname: String
        var typeflag: UInt8
        var mode: Int
        var size: Int
    }

    /// Reads tar entries from a byte stream. After `next()` returns a regular file, `readContent` may
    /// take its bytes; otherwise the next `next()` skips them.
    struct TarReader {
        var source: ByteSource
        private var remaining = 0
        private var padding = 0
        private var ended = false
        static let metadataLimit = 1 << 20

        init(source: ByteSource) { self.source = source }

        mutating func next() async throws -> RawEntry? {
            guard !ended else { return nil }
            // Sizes come from the archive: `remaining + padding` is checked so that a size near
            // Int.max is refused rather than trapping (the byte limit would stop the skip anyway).
            guard let skip = Checked.add(remaining, padding) else {
                throw Refusal("is a damaged tar archive: an entry's size of \(remaining) bytes cannot be skipped", kind: .structural)
            }
            try await source.skip(skip)
            remaining = 0
            padding = 0
            var longName: String?
            var longLink: String?
            var pax: [String: String] = [:]
            while true {
                let offset = source.consumed
                guard let header = try await source.read(512) else {
                    guard longName == nil, longLink == nil, pax.isEmpty else {
                        throw Refusal("is a truncated tar archive: it ends after an extended header", kind: .structural)
                    }
                    ended = true
                    return nil
                }
                if header.allSatisfy({ $0 == 0 }) {
                    ended = true
                    return nil
                }
                try Self.checkChecksum(header, offset: offset)
                let typeflag = header[156]
                guard let size = Self.number(header[124..<136]) else {
                    throw Refusal("is a damaged tar archive: bad size field in the header at byte \(offset)", kind: .structural)
                }
                switch typeflag {
                case UInt8(ascii: "L"), UInt8(ascii: "K"), UInt8(ascii: "x"), UInt8(ascii: "g"):
                    guard size <= Self.metadataLimit else {
                        throw Refusal("has an extended tar header of \(size) bytes at byte \(offset), over the limit of 1 MiB")
                    }
                    var content: [UInt8] = []
                    content.reserveCapacity(size)
                    try await source.consume(size) { content.append(contentsOf: $0) }
                    try await source.skip(Self.padding(size))
                    switch typeflag {
                    case UInt8(ascii: "L"): longName = try Self.string(content, what: "GNU long name", offset: offset)
                    case UInt8(ascii: "K"): longLink = try Self.string(content, what: "GNU long link name", offset: offset)
                    case UInt8(ascii: "x"): pax.merge(try Self.paxRecords(content, offset: offset)) { $1 }
                    default: break  // global pax header: nothing in it changes what is written
                    }
                    continue
                default:
                    break
                }
                let magic = Array(header[257..<262])
                let posix = magic == Array("ustar".utf8) && header[262] == 0
                var name = try Self.string(header[0..<100], what: "name", offset: offset)
                if posix {
                    let prefix = try Self.string(header[345..<500], what: "name prefix", offset: offset)
                    if !prefix.isEmpty { name = prefix + "/" + name }
                }
                if let longName { name = longName }
                if let path = pax["path"] { name = path }
                var linkname = try Self.string(header[157..<257], what: "link name", offset: offset)
                if let longLink { linkname = longLink }
                if let path = pax["linkpath"] { linkname = path }
                var entrySize = size
                if let text = pax["size"] {
                    guard let value = Int(text), value >= 0 else {
                        throw Refusal("is a damaged tar archive: bad pax size '\(displayName(text))' at byte \(offset)", kind: .structural)
                    }
                    entrySize = value
                }
                guard !name.isEmpty else { throw Refusal("has an entry with an empty name at byte \(offset)") }
                guard let mode = Self.number(header[100..<108]) else {
                    throw Refusal("is a damaged tar archive: bad mode field in the header at byte \(offset)", kind: .structural)
                }
                // Links, directories and devices carry no data in a tar stream even when the header
                // says otherwise; the validator refuses such headers.
                remaining = entrySize
                padding = Self.padding(entrySize)
                return RawEntry(name: name, linkname: linkname, typeflag: typeflag, mode: mode, size: entrySize)
            }
        }

        /// Hands the current entry's bytes to `sink`, in pieces.
        mutating func readContent(_ sink: (UnsafeRawBufferPointer) throws -> Void) async throws {
            try await source.consume(remaining, into: sink)
            remaining = 0
        }

        /// Reads what is left of the stream (tar pads to 10 KiB records), still bounded by the limit.
        mutating func drain() async throws {
            try await source.drain()
        }

        static func padding(_ size: Int) -> Int { (512 - size % 512) % 512 }

        static func checkChecksum(_ header: [UInt8], offset: Int) throws {
            var unsigned = 0
            var signed = 0
            for (i, byte) in header.enumerated() {
                let value = (148..<156).contains(i) ? 0x20 : byte
                unsigned += Int(value)
                signed += Int(Int8(bitPattern: value))
            }
            guard let stored = number(header[148..<156]), stored == unsigned || stored == signed else {
                if offset == 0 {
                    throw Refusal("is not a tar archive (it is gzip data, but its first 512 bytes are not a tar header)", kind: .structural)
                }
                throw Refusal("is a damaged tar archive: the header at byte \(offset) has a bad checksum", kind: .structural)
            }
        }

        /// An octal field (NUL or space terminated), or GNU base-256 for large values.
        static func number(_ field: ArraySlice<UInt8>) -> Int? {
            guard let first = field.first else { return 0 }
            if first & 0x80 != 0 {
                guard first == 0x80 else { return nil }  // 0xff: negative
                var value = 0
                for byte in field.dropFirst() {
                    guard value <= (Int.max >> 8) else { return nil }
                    value = value << 8 | Int(byte)
                }
                return value
            }
            var value = 0
            var started = false
            for byte in field {
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "7"):
                    guard value <= (Int.max >> 3) else { return nil }
                    value = value << 3 | Int(byte - UInt8(ascii: "0"))
                    started = true
                case UInt8(ascii: " ") where !started: continue
                case 0, UInt8(ascii: " "): return value
                default: return nil
                }
            }
            return value
        }

        /// A NUL-terminated UTF-8 field.
        static func string(_ bytes: some Collection<UInt8>, what: String, offset: Int) throws -> String {
            let used = bytes.prefix { $0 != 0 }
            guard let text = String(validating: used, as: UTF8.self) else {
                throw Refusal("has an entry whose \(what) is not valid UTF-8, in the header at byte \(offset)")
            }
            return text
        }

        /// Pax records: "LENGTH KEY=VALUE\n", LENGTH counting the whole record.
        static func paxRecords(_ content: [UInt8], offset: Int) throws -> [String: String] {
            var records: [String: String] = [:]
            var position = 0
            let bad = Refusal("is a damaged tar archive: malformed pax header at byte \(offset)", kind: .structural)
            while position < content.count {
                if content[position] == 0 { break }  // some writers pad with NULs
                guard let space = content[position...].firstIndex(of: UInt8(ascii: " ")), space - position <= 20,
                    let length = Int(String(decoding: content[position..<space], as: UTF8.self)),
                    length > space - position + 1, length <= content.count - position,
                    content[position + length - 1] == UInt8(ascii: "\n")
                else { throw bad }
                let record = content[(space + 1)..<(position + length - 1)]
                guard let equals = record.firstIndex(of: UInt8(ascii: "=")) else { throw bad }
                guard let key = String(validating: record[..<equals], as: UTF8.self) else { throw bad }
                let valueBytes = record[(equals + 1)...]
                if ["path", "linkpath", "size"].contains(key) {
                    guard !valueBytes.contains(0), let value = String(validating: valueBytes, as: UTF8.self) else {
                        throw Refusal("has an entry whose pax \(key) is not valid UTF-8 text, in the header at byte \(offset)")
                    }
                    records[key] = value
                }
                position += length
            }
            return records
        }
    }

    /// The decompressed bytes, as they arrive from gzip, counted against the limit.
    struct ByteSource {
        /// The next piece of the decompressed stream (nil at its end): gzip's output, or bytes
        /// already in memory (``BundleArchive/check(tar:limits:)``).
        private let nextChunk: () async throws -> [UInt8]?
        private var chunk: [UInt8] = []
        private var position = 0
        private var finished = false
        /// Bytes received from gzip.
        private(set) var received = 0
        /// Bytes handed out or skipped.
        private(set) var consumed = 0
        let limit: Int

        init(iterator: SubprocessOutputSequence.Iterator, limit: Int) {
            // A class holds the iterator so the closure can advance it.
            final class Box { var iterator: SubprocessOutputSequence.Iterator; init(_ i: SubprocessOutputSequence.Iterator) { iterator = i } }
            let box = Box(iterator)
            self.init(limit: limit) {
                guard let buffer = try await box.iterator.next() else { return nil }
                return buffer.withUnsafeBytes { Array($0) }
            }
        }

        init(limit: Int, next: @escaping () async throws -> [UInt8]?) {
            self.nextChunk = next
            self.limit = limit
        }

        /// Gets the next piece from gzip; false at the end of the stream.
        private mutating func fill() async throws -> Bool {
            while !finished {
                guard let buffer = try await nextChunk() else {
                    finished = true
                    return false
                }
                if buffer.isEmpty { continue }
                received += buffer.count
                guard received <= limit else {
                    throw Refusal("decompresses to more than \(byteCount(limit)), the limit", kind: .overflow)
                }
                chunk = buffer
                position = 0
                return true
            }
            return false
        }

        /// Exactly `count` bytes, or nil when the stream ends before the first of them.
        mutating func read(_ count: Int) async throws -> [UInt8]? {
            if position == chunk.count, !(try await fill()) { return nil }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(count)
            try await consume(count) { bytes.append(contentsOf: $0) }
            return bytes
        }

        mutating func skip(_ count: Int) async throws {
            try await consume(count) { _ in }
        }

        /// Passes the next `count` bytes to `sink`, in pieces.
        mutating func consume(_ count: Int, into sink: (UnsafeRawBufferPointer) throws -> Void) async throws {
            var left = count
            while left > 0 {
                if position == chunk.count {
                    guard try await fill() else {
                        throw Refusal("is a truncated tar archive (it ends inside an entry, at byte \(consumed))", kind: .structural)
                    }
                }
                let start = position
                let take = min(left, chunk.count - start)
                try chunk.withUnsafeBytes { try sink(UnsafeRawBufferPointer(rebasing: $0[start..<(start + take)])) }
                position += take
                consumed += take
                left -= take
            }
        }

        mutating func drain() async throws {
            position = chunk.count
            while try await fill() { position = chunk.count }
        }
    }
}
