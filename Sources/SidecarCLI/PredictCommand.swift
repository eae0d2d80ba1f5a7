import ArgumentParser
import Foundation
import Logging
import Sidecar

#if canImport(Glibc)
import Glibc
#endif

struct PredictCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "predict",
        abstract: "Run a model over JSON Lines: one input per line in, one prediction per line out, in order.",
        discussion: """
            Reads JSON Lines from --input or standard input and writes one JSON line per input line to \
            standard output, in input order. A line that is not valid JSON, or whose prediction failed, \
            gets {"error": "...", "line": N} instead; the other lines go on. Exits 0 when every line got \
            a prediction, 1 when some did not, 2 when the model directory or sidecar.yaml is invalid.

              sidecar predict Examples/iris --workers 2 < Examples/iris/sample.jsonl
            """)

    @Argument(help: "The model directory (handler.py, optional requirements.txt and sidecar.yaml).")
    var directory: String

    @Option(name: .long, help: "Worker processes (default: workers in sidecar.yaml, else 1).")
    var workers: Int?

    @Option(name: .long, help: "process (worker processes) or embedded (the handler runs inside this process); default: executor in sidecar.yaml, else process.")
    var executor: ModelConfiguration.ExecutorKind?

    @Option(name: .long, help: "Read JSON Lines from this file instead of standard input.")
    var input: String?

    @OptionGroup var host: HostArguments

    func run() async throws {
        let logger = try host.logger()
        if let workers, !ModelConfiguration.workerRange.contains(workers) { throw ValidationError("--workers must be from 1 to 256, got \(workers)") }
        // Check the directory before anything else, so a typo costs one line and no environment build.
        let bundle: ModelBundle
        do { bundle = try ModelBundle(directory: directory) } catch { throw reportFailure(error) }
        let reader: LineReader
        do { reader = try LineReader(path: input) } catch {
            StandardStreams.err("error: \(error)\n")
            throw ExitCode(2)
        }

        let failed: Int
        do {
            failed = try await withModel(at: directory, workers: workers, executor: executor, options: host.hostOptions(), logger: logger) { model in
                try await Self.stream(reader, through: model, chunk: max(1, min(16_384, bundle.configuration.batching.maxQueue)))
            }
        } catch let error as SidecarError {
            throw reportFailure(error)
        }
        if failed > 0 {
            StandardStreams.err("sidecar: \(failed) line(s) got an error instead of a prediction\n")
            throw ExitCode(1)
        }
    }

    /// Reads `chunk` lines at a time, predicts them concurrently in pieces of `max_batch_size` (so all
    /// workers share them), and writes the answers in input order. Returns how many lines failed.
    static func stream(_ reader: LineReader, through model: Model, chunk: Int) async throws -> Int {
        let out = OutputWriter()
        let progress = Progress(total: reader.totalBytes)
        var failed = 0
        var lineNumber = 0
        let piece = model.configuration.batching.maxBatchSize
        while true {
            var lines: [(number: Int, text: Substring)] = []
            while lines.count < chunk, let line = reader.next() {
                lineNumber += 1
                if line.allSatisfy({ $0 == " " || $0 == "\t" || $0 == "\r" }) { continue }  // blank lines are not inputs
                lines.append((lineNumber, line))
            }
            if lines.isEmpty { break }
            var answers = [String?](repeating: nil, count: lines.count)
            var items: [(slot: Int, value: JSONValue)] = []
            for (slot, line) in lines.enumerated() {
                do {
                    items.append((slot, try JSONValue(json: line.text)))
                } catch {
                    answers[slot] = errorLine("line \(line.number): not valid JSON; each line must be one JSON value", line: line.number)
                }
            }
            let results = try await withThrowingTaskGroup(of: (Int, [ItemResult]).self) { group in
                for start in stride(from: 0, to: items.count, by: piece) {
                    let part = Array(items[start..<min(items.count, start + piece)].map(\.value))
                    group.addTask { (start, try await model.predict(batch: part)) }
                }
                var all = [ItemResult?](repeating: nil, count: items.count)
                for try await (start, part) in group {
                    for (offset, result) in part.enumerated() { all[start + offset] = result }
                }
                return all
            }
            for (index, item) in items.enumerated() {
                switch results[index]! {
                case .success(let value): answers[item.slot] = value.json
                case .failure(let error): answers[item.slot] = errorLine("\(error.type): \(error.message)", line: lines[item.slot].number)
                }
            }
            for answer in answers {
                if answer!.hasPrefix(#"{"error":"#) { failed += 1 }
                out.write(answer!)
            }
            out.flush()
            progress.update(lines: lineNumber, bytes: reader.bytesRead)
        }
        progress.finish()
        return failed
    }

    static func errorLine(_ message: String, line: Int) -> String {
        struct ErrorLine: Encodable { var error: String; var line: Int }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // Encoding a string and an integer cannot fail; the fallback keeps the output a JSON line anyway.
        let data = (try? encoder.encode(ErrorLine(error: message, line: line))) ?? Data(#"{"error":"unencodable error","line":\#(line)}"#.utf8)
        return String(decoding: data, as: UTF8.self)
    }
}

/// Lines from a file or standard input, read in large blocks.
final class LineReader {
    private let handle: FileHandle
    private var buffer = Data()
    private var position = 0
    private var eof = false
    private(set) var bytesRead = 0
    let totalBytes: Int?

    init(path: String?) throws {
        if let path {
            guard let handle = FileHandle(forReadingAtPath: path) else {
                throw ValidationError("cannot read --input \(path): no such file or not readable")
            }
            self.handle = handle
            totalBytes = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? nil
        } else {
            handle = FileHandle.standardInput
            totalBytes = nil
        }
    }

    func next() -> Substring? {
        while true {
            if let newline = buffer[position...].firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[position..<newline], as: UTF8.self)
                bytesRead += newline - position + 1
                position = newline + 1
                return Substring(line)
            }
            if eof {
                guard position < buffer.count else { return nil }
                let line = String(decoding: buffer[position...], as: UTF8.self)
                bytesRead += buffer.count - position
                position = buffer.count
                return Substring(line)
            }
            let block = handle.readData(ofLength: 1 << 20)
            if block.isEmpty { eof = true }
            buffer = Data(buffer[position...]) + block
            position = 0
        }
    }
}

/// Buffered standard output.
final class OutputWriter {
    private var buffer = Data()

    func write(_ line: String) {
        buffer.append(contentsOf: line.utf8)
        buffer.append(UInt8(ascii: "\n"))
        if buffer.count > 1 << 16 { flush() }
    }

    func flush() {
        guard !buffer.isEmpty else { return }
        StandardStreams.out(buffer)
        buffer.removeAll(keepingCapacity: true)
    }
}

/// A one-line progress display on standard error, only when it is a terminal.
final class Progress {
    private let enabled = isatty(2) == 1
    private let total: Int?
    private let start = ContinuousClock.now

    init(total: Int?) { self.total = total }

    func update(lines: Int, bytes: Int) {
        guard enabled else { return }
        let seconds = max(0.001, (ContinuousClock.now - start).inSeconds)
        var text = "\r\(lines) lines, \(Int(Double(lines) / seconds))/s"
        if let total, total > 0 {
            let fraction = min(1, Double(bytes) / Double(total))
            let filled = Int(fraction * 30)
            text = "\r[" + String(repeating: "#", count: filled) + String(repeating: ".", count: 30 - filled) + "] \(Int(fraction * 100))% " + text.dropFirst()
        }
        StandardStreams.err(text)
    }

    func finish() {
        guard enabled else { return }
        StandardStreams.err("\n")
    }
}

extension ModelConfiguration.ExecutorKind: ExpressibleByArgument {}
