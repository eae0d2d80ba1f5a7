import Crypto
import Foundation
import Synchronization

/// A batch job's working directory, `<output>.job/`: `job.json` (what the job is: the input's
/// path, size, modification time and SHA-256, the format, the span size, the id field), one
/// `span-N.out`/`span-N.err` pair per finished span, and `journal.jsonl`, one line per finished
/// span appended (and synced) only after its parts are in place. A span the journal lists is done;
/// anything else is redone. `finish` joins the parts in order into the output and errors files,
/// each through a temporary file renamed into place, then removes the directory.
final class JobJournal: Sendable {
    struct Finished: Codable, Sendable {
        var span: Int
        var ok: Int
        var failed: Int
        /// The parts' sizes: a part that does not have them (lost in a machine crash) is redone.
        var outBytes: Int
        var errBytes: Int

        enum CodingKeys: String, CodingKey { case span, ok, failed, outBytes = "out_bytes", errBytes = "err_bytes" }
    }

    struct Identity: Codable, Equatable {
        var input: String
        var size: Int
        var modified: Double
        /// Of the whole input: a file rewritten in place with its size and time kept is caught too.
        var sha256: String
        var format: String
        var spanLines: Int
        var idField: String

        enum CodingKeys: String, CodingKey {
            case input, size, modified, sha256, format, spanLines = "span_lines", idField = "id_field"
        }
    }

    let spec: ScoringJobSpec
    let directory: URL
    /// Spans an earlier run finished.
    let finished: [Int: Finished]
    /// Line breaks in the input (a last line without one counts too).
    let lines: Int
    private let journal: Mutex<FileHandle>

    init(spec: ScoringJobSpec) throws {
        self.spec = spec
        let fm = FileManager.default
        directory = URL(fileURLWithPath: spec.jobDirectory)
        let (identity, lines) = try Self.identity(spec)
        self.lines = lines
        let jobFile = directory.appendingPathComponent("job.json")
        let journalFile = directory.appendingPathComponent("journal.jsonl")
        var finished: [Int: Finished] = [:]
        if fm.fileExists(atPath: directory.path) {
            try Self.checkStart(spec)
            guard let data = fm.contents(atPath: jobFile.path), let earlier = try? JSONDecoder().decode(Identity.self, from: data) else {
                throw SidecarError(.conflict, "\(jobFile.path) is missing or unreadable; delete \(directory.path) to start over")
            }
            if let change = Self.difference(earlier, identity) {
                throw SidecarError(.conflict, "cannot resume \(spec.output): \(change) since the job started; delete \(directory.path) to start over")
            }
            if let text = try? String(contentsOf: journalFile, encoding: .utf8) {
                // A line cut short by a crash is not a finished span.
                for line in text.split(separator: "\n") {
                    if let entry = try? JSONDecoder().decode(Finished.self, from: Data(line.utf8)),
                        Self.size(Self.part(directory, entry.span, "out")) == entry.outBytes,
                        Self.size(Self.part(directory, entry.span, "err")) == entry.errBytes
                    {
                        finished[entry.span] = entry
                    }
                }
            }
        } else {
            try fm.createDirectory(at: directory, withIntermediateDirectories: false)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            try Self.writeAtomically(try encoder.encode(identity), to: jobFile)
        }
        if !fm.fileExists(atPath: journalFile.path) { fm.createFile(atPath: journalFile.path, contents: nil) }
        guard let handle = FileHandle(forWritingAtPath: journalFile.path) else {
            throw SidecarError(.invalidInput, "cannot write the job journal \(journalFile.path)")
        }
        handle.seekToEndOfFile()
        self.journal = Mutex(handle)
        self.finished = finished
    }

    /// Refuses to start over an unfinished job unless asked to resume it.
    static func checkStart(_ spec: ScoringJobSpec) throws {
        guard spec.resume || !FileManager.default.fileExists(atPath: spec.jobDirectory) else {
            throw SidecarError(
                .conflict,
                "\(spec.jobDirectory) holds an unfinished job for \(spec.output); pass --resume (\"resume\": true) to continue it, or delete it to start over")
        }
    }

    /// Writes a finished span's parts, then journals it with their sizes. Nothing is synced here:
    /// a killed process loses nothing the kernel has, and after a machine crash a span whose
    /// journal line or parts did not survive whole is redone; only the finished output is synced.
    func commit(span: Int, output: [UInt8], errors: [UInt8], ok: Int, failed: Int) throws {
        try Self.writeAtomically(Data(output), to: Self.part(directory, span, "out"), sync: false)
        try Self.writeAtomically(Data(errors), to: Self.part(directory, span, "err"), sync: false)
        var line = try JSONEncoder().encode(Finished(span: span, ok: ok, failed: failed, outBytes: output.count, errBytes: errors.count))
        line.append(0x0A)
        try journal.withLock { try $0.write(contentsOf: line) }
    }

    private static func size(_ url: URL) -> Int? {
        (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int) ?? nil
    }

    /// Joins the parts of spans 0..<spans into the output and errors files, then removes the job.
    func finish(spans: Int) throws {
        try join(spans, "out", into: spec.output)
        try join(spans, "err", into: spec.errorsPath)
        try? journal.withLock { try $0.close() }
        try FileManager.default.removeItem(at: directory)
    }

    private func join(_ spans: Int, _ kind: String, into path: String) throws {
        let target = URL(fileURLWithPath: path)
        let temporary = target.deletingLastPathComponent().appendingPathComponent(".\(target.lastPathComponent).tmp-\(getpid())")
        FileManager.default.createFile(atPath: temporary.path, contents: nil)
        guard let out = FileHandle(forWritingAtPath: temporary.path) else { throw SidecarError(.invalidInput, "cannot write \(temporary.path)") }
        do {
            for span in 0..<spans {
                let part = Self.part(directory, span, kind)
                guard let data = FileManager.default.contents(atPath: part.path) else {
                    throw SidecarError(.invalidInput, "the job's part \(part.path) is missing; delete \(directory.path) and run the job again")
                }
                try out.write(contentsOf: data)
            }
            try out.synchronize()
            try out.close()
        } catch {
            try? out.close()
            try? FileManager.default.removeItem(at: temporary)
            throw error
        }
        guard rename(temporary.path, target.path) == 0 else {
            throw SidecarError(.invalidInput, "cannot move the finished \(kind == "out" ? "output" : "errors") into \(path): \(String(cString: strerror(errno)))")
        }
    }

    private static func part(_ directory: URL, _ span: Int, _ kind: String) -> URL {
        directory.appendingPathComponent(String(format: "span-%08d.%@", span, kind))
    }

    private static func writeAtomically(_ data: Data, to url: URL, sync: Bool = true) throws {
        let temporary = url.appendingPathExtension("tmp")
        guard FileManager.default.createFile(atPath: temporary.path, contents: data) else {
            throw SidecarError(.invalidInput, "cannot write \(temporary.path)")
        }
        if sync, let handle = FileHandle(forWritingAtPath: temporary.path) {
            try handle.synchronize()
            try handle.close()
        }
        guard rename(temporary.path, url.path) == 0 else {
            throw SidecarError(.invalidInput, "cannot rename \(temporary.path): \(String(cString: strerror(errno)))")
        }
    }

    private static func identity(_ spec: ScoringJobSpec) throws -> (Identity, lines: Int) {
        let path = URL(fileURLWithPath: spec.input).standardizedFileURL.path
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        let (sha256, lines) = try scan(path)
        let identity = Identity(
            input: path, size: (attributes[.size] as? Int) ?? 0, modified: (attributes[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0,
            sha256: sha256, format: spec.resolvedFormat.rawValue, spanLines: spec.spanLines, idField: spec.idField)
        return (identity, lines)
    }

    private static func difference(_ earlier: Identity, _ now: Identity) -> String? {
        if earlier.input != now.input { return "the input was \(earlier.input), now \(now.input)" }
        if earlier.size != now.size || earlier.modified != now.modified || earlier.sha256 != now.sha256 {
            return "the input \(now.input) changed (its size, modification time or content)"
        }
        if earlier.format != now.format { return "the format was \(earlier.format), now \(now.format)" }
        if earlier.spanLines != now.spanLines { return "span_lines was \(earlier.spanLines), now \(now.spanLines)" }
        if earlier.idField != now.idField { return "id_field was '\(earlier.idField)', now '\(now.idField)'" }
        return nil
    }

    /// The input's SHA-256 and its line count (a last line without a break counts too), in one
    /// pass over the file.
    private static func scan(_ path: String) throws -> (sha256: String, lines: Int) {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw SidecarError(.invalidInput, "cannot read the input \(path)") }
        defer { try? handle.close() }
        var hasher = SHA256()
        var lines = 0
        var last: UInt8 = 0x0A
        while true {
            let block = handle.readData(ofLength: 1 << 22)
            if block.isEmpty { break }
            hasher.update(data: block)
            block.withUnsafeBytes { raw in
                for byte in raw where byte == 0x0A { lines += 1 }
                last = raw.last ?? last
            }
        }
        return (hasher.finalize().map { String(format: "%02x", $0) }.joined(), last == 0x0A ? lines : lines + 1)
    }
}
