import Foundation

/// A scoring job's input: JSON Lines or CSV.
public enum ScoringJobFormat: String, Sendable, CaseIterable { case jsonl, csv }

/// One input record of a batch job: where it starts in the file, and the item it becomes (or why
/// it cannot be one).
struct JobRecord: Sendable {
    /// The 1-based line the record starts on.
    var line: Int
    /// The item's JSON, or the reason the record is malformed.
    var item: Result<Data, JobRecordError>
    /// The `id_field` value's JSON text, when the item is an object that has it.
    var id: Data?
}

struct JobRecordError: Error, Sendable {
    var reason: String
}

/// Reads a batch job's input file record by record, in large blocks, with the byte offset reached
/// (for progress). JSON Lines: each non-blank line is one item, passed on as it is (the worker
/// decodes each item alone, so a malformed line fails alone there). CSV: the first record is the
/// header, each later record an object of column → value (RFC 4180 quoting: quoted fields may hold
/// commas, doubled quotes and line breaks; unquoted numbers are numbers, empty unquoted fields null).
final class JobRecordReader {
    typealias Format = ScoringJobFormat

    private let handle: FileHandle
    private let format: Format
    private let idField: String
    private var buffer: [UInt8] = []
    /// The same bytes as `buffer`, as `Data` made once per block: a JSON line is a slice of it
    /// (sharing its storage), not an allocation and copy of its own.
    private var snapshot = Data()
    /// Made again only when a line is taken from a buffer that changed: a line longer than a block
    /// must not copy the whole buffer at every block.
    private var snapshotIsCurrent = false
    private var position = 0
    private var eof = false
    private var nextLine = 1
    private var header: [String]?
    /// Bytes consumed so far.
    private(set) var offset = 0

    init(path: String, format: Format, idField: String) throws {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw SidecarError(.invalidInput, "cannot read the input \(path): no such file or not readable")
        }
        self.handle = handle
        self.format = format
        self.idField = idField
        if format == .csv {
            guard let first = try nextCSVRecord() else { return }
            switch first.fields {
            case .success(let names):
                // A spreadsheet's UTF-8 export starts with a byte-order mark; it is not part of the name.
                header = names.enumerated().map { $0.offset == 0 && $0.element.text.hasPrefix("\u{FEFF}") ? String($0.element.text.dropFirst()) : $0.element.text }
            case .failure(let error):
                throw SidecarError(.invalidInput, "\(path): the CSV header (line 1) is malformed: \(error.reason)")
            }
        }
    }

    deinit { try? handle.close() }

    /// The next record; nil at the end of the file.
    func next() throws -> JobRecord? {
        switch format {
        case .jsonl:
            while let (line, range) = nextLineBytes() {
                if buffer[range].allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }  // blank lines are not inputs
                if !snapshotIsCurrent {
                    snapshot = Data(buffer)
                    snapshotIsCurrent = true
                }
                let data = snapshot[range]
                return JobRecord(line: line, item: .success(data), id: JSONField.raw(idField, in: data))
            }
            return nil
        case .csv:
            guard let record = try nextCSVRecord() else { return nil }
            let header = header ?? []
            switch record.fields {
            case .failure(let error): return JobRecord(line: record.line, item: .failure(error), id: nil)
            case .success(let fields):
                guard fields.count == header.count else {
                    return JobRecord(line: record.line, item: .failure(JobRecordError(reason: "the row has \(fields.count) field(s), the header \(header.count)")), id: nil)
                }
                var object = JSONWriterBytes()
                var id: Data?
                object.append("{")
                for (index, field) in fields.enumerated() {
                    if index > 0 { object.append(",") }
                    object.string(header[index])
                    object.append(":")
                    let start = object.bytes.count
                    field.writeJSON(into: &object)
                    if header[index] == idField { id = Data(object.bytes[start...]) }
                }
                object.append("}")
                return JobRecord(line: record.line, item: .success(Data(object.bytes)), id: id)
            }
        }
    }

    // MARK: - Bytes

    /// Makes sure at least one byte past `position` is buffered, unless the file ended.
    private func fill() -> Bool {
        while position >= buffer.count {
            if readBlock() { return false }
        }
        return true
    }

    private func nextLineBytes() -> (Int, Range<Int>)? {
        var scanned = 0  // bytes past `position` known to hold no line break
        while true {
            if let newline = buffer[(position + scanned)...].firstIndex(of: 0x0A) {
                let line = position..<newline
                offset += newline - position + 1
                position = newline + 1
                defer { nextLine += 1 }
                return (nextLine, line)
            }
            scanned = buffer.count - position
            if readBlock() {
                guard position < buffer.count else { return nil }
                let line = position..<buffer.count
                offset += buffer.count - position
                position = buffer.count
                defer { nextLine += 1 }
                return (nextLine, line)
            }
        }
    }

    /// Reads one more block after what is unconsumed (which moves to the buffer's start); true once
    /// the file has ended.
    private func readBlock() -> Bool {
        guard !eof else { return true }
        let block = handle.readData(ofLength: 1 << 20)
        if block.isEmpty {
            eof = true
            return true
        }
        buffer.removeFirst(position)
        position = 0
        buffer.append(contentsOf: block)
        snapshotIsCurrent = false
        return false
    }

    // MARK: - CSV

    struct CSVField {
        var text: String
        var quoted: Bool

        func writeJSON(into out: inout JSONWriterBytes) {
            if quoted { return out.string(text) }
            if text.isEmpty { return out.append("null") }
            // A number the handler's JSON decoder can hold: 3e500 is JSON's grammar but no float.
            if JSONField.isNumber(text), Double(text)?.isFinite == true { return out.append(text) }
            out.string(text)
        }
    }

    /// The next CSV record with the line it starts on: its fields, or why it is malformed (an
    /// unterminated quote, a quote inside an unquoted field, text after a closing quote).
    private func nextCSVRecord() throws -> (line: Int, fields: Result<[CSVField], JobRecordError>)? {
        // Skip blank lines between records.
        while fill(), buffer[position] == 0x0A || buffer[position] == 0x0D {
            if buffer[position] == 0x0A { nextLine += 1 }
            position += 1
            offset += 1
        }
        guard fill() else { return nil }
        let startLine = nextLine
        var fields: [CSVField] = []
        var field: [UInt8] = []
        var quoted = false
        var inQuotes = false
        var afterQuote = false
        var problem: String?
        func endField() {
            fields.append(CSVField(text: String(decoding: field, as: UTF8.self), quoted: quoted))
            field.removeAll(keepingCapacity: true)
            quoted = false
            afterQuote = false
        }
        while true {
            guard fill() else {
                if inQuotes {
                    return (startLine, .failure(JobRecordError(reason: "a quoted field opened on line \(startLine) never closes")))
                }
                endField()
                break
            }
            let byte = buffer[position]
            position += 1
            offset += 1
            if inQuotes {
                if byte == 0x22 {
                    if fill(), buffer[position] == 0x22 {  // "" inside quotes is one "
                        field.append(0x22)
                        position += 1
                        offset += 1
                    } else {
                        inQuotes = false
                        afterQuote = true
                    }
                } else {
                    if byte == 0x0A { nextLine += 1 }
                    field.append(byte)
                }
                continue
            }
            switch byte {
            case 0x2C: endField()  // ,
            case 0x0A:
                nextLine += 1
                if field.last == 0x0D { field.removeLast() }
                endField()
                return (startLine, problem.map { .failure(JobRecordError(reason: $0)) } ?? .success(fields))
            case 0x0D where afterQuote: break
            case 0x22:
                if field.isEmpty && !quoted && !afterQuote {
                    inQuotes = true
                    quoted = true
                } else {
                    problem = problem ?? "a quote inside an unquoted field (field \(fields.count + 1)); quote the whole field and double the quotes inside"
                }
            default:
                if afterQuote {
                    problem = problem ?? "text after the closing quote of field \(fields.count + 1)"
                } else {
                    field.append(byte)
                }
            }
        }
        return (startLine, problem.map { .failure(JobRecordError(reason: $0)) } ?? .success(fields))
    }
}

/// A small JSON text builder over bytes.
struct JSONWriterBytes {
    var bytes: [UInt8] = []

    mutating func append(_ text: String) { bytes.append(contentsOf: text.utf8) }
    mutating func append(_ data: [UInt8]) { bytes.append(contentsOf: data) }
    mutating func append(_ data: ArraySlice<UInt8>) { bytes.append(contentsOf: data) }
    /// `Data` by its buffer (appending it as a sequence goes byte by byte).
    mutating func append(data: Data) { data.withUnsafeBytes { bytes.append(contentsOf: $0) } }

    mutating func append(integer value: Int) {
        guard value > 0 else { return append(String(value)) }
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var count = 0
        var rest = value
        withUnsafeMutableBytes(of: &digits) { buffer in
            while rest > 0 {
                buffer[19 - count] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                count += 1
            }
            bytes.append(contentsOf: buffer[(20 - count)...])
        }
    }

    mutating func string(_ text: String) {
        bytes.append(0x22)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": bytes.append(contentsOf: [0x5C, 0x22])
            case "\\": bytes.append(contentsOf: [0x5C, 0x5C])
            case "\n": bytes.append(contentsOf: [0x5C, 0x6E])
            case "\r": bytes.append(contentsOf: [0x5C, 0x72])
            case "\t": bytes.append(contentsOf: [0x5C, 0x74])
            case _ where scalar.value < 0x20:
                bytes.append(contentsOf: Array(String(format: "\\u%04x", scalar.value).utf8))
            default: bytes.append(contentsOf: Array(String(scalar).utf8))
            }
        }
        bytes.append(0x22)
    }
}

/// Looks into JSON text without parsing all of it.
enum JSONField {
    /// The raw JSON text of `key`'s value when `data` is an object with that key at its top level
    /// (the last one when the key repeats); nil otherwise (not an object, malformed, no such key).
    static func raw(_ key: String, in data: Data) -> Data? {
        data.withUnsafeBytes { raw -> Data? in
            let b = raw.bindMemory(to: UInt8.self)
            var i = 0
            func skipSpace() { while i < b.count, b[i] == 0x20 || b[i] == 0x09 || b[i] == 0x0A || b[i] == 0x0D { i += 1 } }
            /// Skips a string starting at the quote at `i`; false if it does not end.
            func skipString() -> Bool {
                i += 1
                while i < b.count {
                    if b[i] == 0x5C { i += 2; continue }
                    if b[i] == 0x22 { i += 1; return true }
                    i += 1
                }
                return false
            }
            /// Skips one value; false if malformed.
            func skipValue() -> Bool {
                skipSpace()
                guard i < b.count else { return false }
                if b[i] == 0x22 { return skipString() }
                if b[i] == 0x7B || b[i] == 0x5B {
                    var depth = 0
                    while i < b.count {
                        switch b[i] {
                        case 0x22: if !skipString() { return false }; continue
                        case 0x7B, 0x5B: depth += 1
                        case 0x7D, 0x5D:
                            depth -= 1
                            if depth == 0 { i += 1; return true }
                        default: break
                        }
                        i += 1
                    }
                    return false
                }
                let start = i
                while i < b.count, b[i] != 0x2C, b[i] != 0x7D, b[i] != 0x5D, b[i] != 0x20, b[i] != 0x0A, b[i] != 0x0D, b[i] != 0x09 { i += 1 }
                return i > start
            }
            skipSpace()
            guard i < b.count, b[i] == 0x7B else { return nil }
            i += 1
            let wanted = Array(key.utf8)
            // The last occurrence of a repeated key wins, as in Python's json (which the worker uses)
            // and Foundation's parser, so the id written beside a prediction is the one the model saw.
            var found: Range<Int>?
            // Malformed text after the key was found still names it: an error line for an invalid
            // record shows the id the user wrote.
            func last() -> Data? { found.map { Data(b[$0]) } }
            skipSpace()
            if i < b.count, b[i] == 0x7D { return nil }
            while true {
                skipSpace()
                guard i < b.count, b[i] == 0x22 else { return last() }
                let keyStart = i + 1
                guard skipString() else { return last() }
                let name = b[keyStart..<(i - 1)]
                skipSpace()
                guard i < b.count, b[i] == 0x3A else { return last() }
                i += 1
                skipSpace()
                let valueStart = i
                guard skipValue() else { return last() }
                if name.elementsEqual(wanted) || (name.contains(0x5C) && unescaped(b[(keyStart - 1)..<keyStart + name.count + 1]) == key) {
                    found = valueStart..<i
                }
                skipSpace()
                if i < b.count, b[i] == 0x7D { return last() }
                guard i < b.count, b[i] == 0x2C else { return last() }
                i += 1
            }
        }
    }

    /// A key written with escapes (`"i\u0064"` is `"id"` to every JSON parser).
    private static func unescaped(_ quoted: Slice<UnsafeBufferPointer<UInt8>>) -> String? {
        (try? JSONSerialization.jsonObject(with: Data(quoted), options: [.fragmentsAllowed])) as? String
    }

    /// A JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    static func isNumber(_ text: String) -> Bool {
        let b = Array(text.utf8)
        var i = 0
        func digits() -> Int {
            let start = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
            return i - start
        }
        if i < b.count, b[i] == 0x2D { i += 1 }
        guard i < b.count else { return false }
        if b[i] == 0x30 { i += 1 } else if digits() == 0 { return false }
        if i < b.count, b[i] == 0x2E {
            i += 1
            guard digits() > 0 else { return false }
        }
        if i < b.count, b[i] == 0x65 || b[i] == 0x45 {
            i += 1
            if i < b.count, b[i] == 0x2B || b[i] == 0x2D { i += 1 }
            guard digits() > 0 else { return false }
        }
        return i == b.count
    }
}
