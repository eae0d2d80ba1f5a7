import Foundation
import Synchronization

/// What a batch scoring job reads and writes (`sidecar batch`, `POST /admin/v1/jobs`).
public struct ScoringJobSpec: Sendable, Equatable {
    public typealias Format = ScoringJobFormat

    public var input: String
    public var output: String
    /// Where error lines go (nil: `<output>.errors.jsonl`).
    public var errors: String?
    /// nil: from the input's extension (`.csv` is CSV, anything else JSON Lines).
    public var format: Format?
    /// Continue the unfinished job in `<output>.job/` instead of refusing to start.
    public var resume = false
    /// Records per span, the unit of work that is written, journaled and never redone.
    public var spanLines = 10_000
    /// The field of an object item copied to its output line as `id`.
    public var idField = "id"

    public static let spanLinesRange = 1...1_000_000

    public init(input: String, output: String) {
        self.input = input
        self.output = output
    }

    public var errorsPath: String { errors ?? output + ".errors.jsonl" }
    public var jobDirectory: String { output + ".job" }
    public var resolvedFormat: Format { format ?? (input.lowercased().hasSuffix(".csv") ? .csv : .jsonl) }
}

/// Where a job is, for the progress display and `GET /admin/v1/jobs/{id}`.
public struct ScoringJobProgress: Sendable, Equatable {
    public enum State: String, Sendable { case running, completed, failed, cancelled }
    public var state: State = .running
    /// Lines in the input (JSON Lines; nil for CSV, whose records may span lines, and until counted).
    public var lines: Int?
    /// Records finished (scored or found malformed), including spans finished by an earlier run.
    public var done = 0
    public var ok = 0
    public var failed = 0
    /// Records of spans a resumed run found finished (not scored again).
    public var resumed = 0
    public var bytesDone = 0
    public var bytesTotal = 0
    public var elapsed: Duration = .zero
    /// Items this run scored per second.
    public var itemsPerSecond: Double = 0
    public var error: String?

    /// Seconds left at this run's pace, when it can tell.
    public var eta: Double? {
        let seconds = elapsed.inSeconds
        let fresh = bytesDone
        guard state == .running, seconds > 0.5, fresh > 0, bytesTotal > bytesDone else { return nil }
        return Double(bytesTotal - bytesDone) / (Double(fresh) / seconds)
    }
}

/// A batch scoring job: the input split into spans of records, each span's items fed through the
/// model's batcher (as many at once as its queue allows, never the whole file), its output and
/// error lines written to a part file and journaled once complete; at the end the parts are joined
/// in input order into the output and the errors file, each renamed into place.
///
/// A malformed record or an item the handler fails for is an error line, never a failed job. After
/// a crash, SIGKILL or Ctrl-C, `resume` redoes only the spans the journal does not list, so no item
/// of a finished span is scored again; the journal's job file refuses a resume over a changed
/// input or span size.
public final class ScoringJob: Sendable {
    public let spec: ScoringJobSpec
    private let state = Mutex(ScoringJobProgress())
    private let runner = Mutex<Task<ScoringJobProgress, any Error>?>(nil)
    private let cancelled = Atomic<Bool>(false)
    /// Spans scored at once: one is read and one written while another is in the queue.
    static let parallelSpans = 3

    public init(spec: ScoringJobSpec) throws {
        guard ScoringJobSpec.spanLinesRange.contains(spec.spanLines) else {
            throw SidecarError(.invalidInput, "span_lines must be from 1 to 1000000, got \(spec.spanLines)")
        }
        guard !spec.idField.isEmpty else { throw SidecarError(.invalidInput, "id_field must not be empty") }
        guard FileManager.default.isReadableFile(atPath: spec.input) else {
            throw SidecarError(.invalidInput, "cannot read the input \(spec.input): no such file or not readable")
        }
        let outputDirectory = URL(fileURLWithPath: spec.output).deletingLastPathComponent().path
        guard FileManager.default.isWritableFile(atPath: outputDirectory) else {
            throw SidecarError(.invalidInput, "cannot write the output \(spec.output): its directory \(outputDirectory) does not exist or is not writable")
        }
        try JobJournal.checkStart(spec)
        self.spec = spec
    }

    public var progress: ScoringJobProgress { state.withLock { $0 } }

    /// Stops the job: spans in flight are dropped, finished ones stay journaled for a resume.
    public func cancel() {
        cancelled.store(true, ordering: .relaxed)
        runner.withLock { $0 }?.cancel()
    }

    /// Runs the job to its end with `model`; returns the final progress. Throws when it cannot run or
    /// was cancelled (the journal keeps what finished).
    @discardableResult
    public func run(on model: Model) async throws -> ScoringJobProgress {
        let task = Task { try await self.work(model) }
        runner.withLock { $0 = task }
        if cancelled.load(ordering: .relaxed) { task.cancel() }
        do {
            return try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
        } catch {
            let wasCancelled = error is CancellationError || cancelled.load(ordering: .relaxed)
            state.withLock {
                $0.state = wasCancelled ? .cancelled : .failed
                $0.error = wasCancelled ? "cancelled; run again with resume to continue" : "\(error)"
            }
            throw wasCancelled ? CancellationError() : error
        }
    }

    // MARK: - The work

    private func work(_ model: Model) async throws -> ScoringJobProgress {
        let start = ContinuousClock.now
        let journal = try JobJournal(spec: spec)
        let format = spec.resolvedFormat
        let total = (try? FileManager.default.attributesOfItem(atPath: spec.input)[.size] as? Int) ?? 0
        state.withLock {
            $0.bytesTotal = total
            $0.lines = format == .jsonl ? journal.lines : nil
        }
        let reader = try JobRecordReader(path: spec.input, format: format, idField: spec.idField)
        let scorer = SpanScorer(model: model)
        var spanCount = 0
        try await withThrowingTaskGroup(of: Void.self) { group in
            var running = 0
            while true {
                try Task.checkCancellation()
                var records: [JobRecord] = []
                records.reserveCapacity(min(spec.spanLines, 65_536))
                while records.count < spec.spanLines, let record = try reader.next() { records.append(record) }
                if records.isEmpty { break }
                let index = spanCount
                spanCount += 1
                let bytes = reader.offset
                if let finished = journal.finished[index] {
                    state.withLock {
                        $0.done += records.count
                        $0.ok += finished.ok
                        $0.failed += finished.failed
                        $0.resumed += records.count
                        $0.bytesDone = bytes
                    }
                    continue
                }
                if running == Self.parallelSpans {
                    try await group.next()
                    running -= 1
                }
                running += 1
                group.addTask {
                    let (out, errors, ok, failed) = try await scorer.score(records)
                    try journal.commit(span: index, output: out, errors: errors, ok: ok, failed: failed)
                    self.state.withLock {
                        $0.done += records.count
                        $0.ok += ok
                        $0.failed += failed
                        $0.bytesDone = max($0.bytesDone, bytes)
                        let elapsed = ContinuousClock.now - start
                        $0.elapsed = elapsed
                        $0.itemsPerSecond = Double($0.done - $0.resumed) / max(0.001, elapsed.inSeconds)
                    }
                }
            }
            try await group.waitForAll()
        }
        try Task.checkCancellation()
        try journal.finish(spans: spanCount)
        return state.withLock {
            let elapsed = ContinuousClock.now - start
            $0.elapsed = elapsed
            $0.itemsPerSecond = Double($0.done - $0.resumed) / max(0.001, elapsed.inSeconds)
            $0.bytesDone = total
            $0.state = .completed
            return $0
        }
    }
}

/// Scores one span's records through the model: items in pieces of `max_batch_size` (at most
/// 1024, the call size `sidecar-bench` measures), as many pieces at once as half the model's queue
/// holds, and the span's output and error lines in input order.
struct SpanScorer: Sendable {
    let model: Model

    private static let lineKey = Array(#"{"line":"#.utf8)
    private static let idKey = Array(#","id":"#.utf8)
    private static let null = Array("null".utf8)
    private static let predictionKey = Array(#","prediction":"#.utf8)
    private static let reasonKey = Array(#","reason":"#.utf8)
    private static let lineEnd = Array("}\n".utf8)

    func score(_ records: [JobRecord]) async throws -> (output: [UInt8], errors: [UInt8], ok: Int, failed: Int) {
        let batching = model.configuration.batching
        let piece = max(1, min(batching.maxBatchSize, 1024, batching.maxQueue))
        // Every span in flight may hold `window` pieces: together at most half the queue, so the
        // job leaves room for the model's other callers and is never refused for its own items.
        let window = max(1, min(16, batching.maxQueue / (2 * ScoringJob.parallelSpans * piece)))
        // The records that are items, with their item: index and value taken together, so the
        // pieces below never look into a record again.
        var items: [Int] = []
        var values: [JSONValue] = []
        for (index, record) in records.enumerated() {
            if case .success(let data) = record.item {
                items.append(index)
                values.append(JSONValue(trusted: data))
            }
        }
        var results = [ItemResult?](repeating: nil, count: records.count)
        try await withThrowingTaskGroup(of: (Int, [ItemResult]).self) { group in
            var running = 0
            for start in stride(from: 0, to: items.count, by: piece) {
                if running == window, let (at, part) = try await group.next() {
                    running -= 1
                    for (offset, result) in part.enumerated() { results[items[at + offset]] = result }
                }
                let part = Array(values[start..<min(values.count, start + piece)])
                running += 1
                group.addTask { (start, try await predict(part)) }
            }
            for try await (at, part) in group {
                for (offset, result) in part.enumerated() { results[items[at + offset]] = result }
            }
        }
        // Built as bytes, a few copies per record: at echo's pace this loop is a good part of the
        // job's own CPU, so no String interpolation and no Data iteration here.
        // An item the model did not run (it stopped, or its executor failed under the batch) is not
        // the item's failure: the span must not be journaled, or a resume would never score it.
        for case .failure(let error)? in results where error.kind == .unavailable {
            throw SidecarError(.unavailable, "model '\(model.name)' stopped serving during the job: \(error.message)")
        }
        var output = JSONWriterBytes()
        output.bytes.reserveCapacity(records.count * 48)
        var errors = JSONWriterBytes()
        var ok = 0
        var failed = 0
        func start(_ out: inout JSONWriterBytes, _ record: JobRecord) {
            out.append(Self.lineKey)
            out.append(integer: record.line)
            out.append(Self.idKey)
            if let id = record.id { out.append(data: id) } else { out.append(Self.null) }
        }
        for (index, record) in records.enumerated() {
            let reason: String
            switch record.item {
            case .failure(let error): reason = error.reason
            case .success:
                switch results[index] {
                case .success(let prediction)?:
                    ok += 1
                    start(&output, record)
                    output.append(Self.predictionKey)
                    output.append(data: prediction.data)
                    output.append(Self.lineEnd)
                    continue
                case .failure(let error)?: reason = "\(error.type): \(error.message)"
                case nil: reason = "no result"
                }
            }
            failed += 1
            start(&errors, record)
            errors.append(Self.reasonKey)
            errors.string(reason)
            errors.append(Self.lineEnd)
        }
        return (output.bytes, errors.bytes, ok, failed)
    }

    /// One piece; a full queue (other callers share it) is waited out, a model that stopped fails
    /// the job (its journal keeps what finished).
    private func predict(_ values: [JSONValue]) async throws -> [ItemResult] {
        var attempt = 0
        while true {
            do {
                return try await model.submitPredictions(values)
            } catch let error as SidecarError where error.code == .queueFull {
                // Other callers filled the queue: wait for room (a cancelled job stops here).
                attempt = min(attempt + 1, 5)
                try await Task.sleep(for: .milliseconds(10 << attempt))
            }
        }
    }
}

