import ArgumentParser
import Dispatch
import Foundation
import Sidecar

#if canImport(Glibc)
import Glibc
#endif

struct BatchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch",
        abstract: "Score a file: JSON Lines or CSV in, one output line per good record, resumable.",
        discussion: """
            Splits the input into spans of --span-lines records and feeds them through the model's batcher \
            (bounded memory: never more than the model's queue holds). Output, in input order: \
            {"line": N, "id": ID, "prediction": P} per record scored; the errors file gets \
            {"line": N, "id": ID, "reason": "..."} per malformed record or failed prediction (not a failed \
            job). Both appear, renamed into place, only when the job completes; until then the work is in \
            OUTPUT.job/, and after a crash, a kill or Ctrl-C, --resume redoes only the unfinished spans.

            CSV: the first row is the header; each row becomes an object of column → value (quoted fields \
            may hold commas, doubled quotes and line breaks; unquoted numbers are numbers, empty fields null).

            Exit codes: 0 the job completed (with or without item errors), 1 it could not run, 130 \
            interrupted (progress saved for --resume).

              sidecar batch Examples/iris --input Examples/iris/sample.jsonl --output scores.jsonl
            """)

    @Argument(help: "The model directory (handler.py, optional requirements.txt and sidecar.yaml).")
    var directory: String

    @Option(name: .long, help: "The input file.")
    var input: String

    @Option(name: .long, help: "The output file (JSON Lines).")
    var output: String

    @Option(name: .long, help: "The errors file (default: OUTPUT.errors.jsonl).")
    var errors: String?

    @Option(name: .long, help: "jsonl or csv (default: from the input's extension).")
    var format: ScoringJobFormat?

    @Flag(name: .long, help: "Continue the unfinished job in OUTPUT.job/ (only its unfinished spans are scored).")
    var resume = false

    @Option(name: .long, help: "Records per span: the unit written, journaled and never redone.")
    var spanLines = 10_000

    @Option(name: .long, help: "The field of an object item copied to its output line as id.")
    var idField = "id"

    @Option(name: .long, help: "Worker processes (default: workers in sidecar.yaml, else 1).")
    var workers: Int?

    @Option(name: .long, help: "process or embedded (default: executor in sidecar.yaml, else process).")
    var executor: ModelConfiguration.ExecutorKind?

    @OptionGroup var host: HostArguments

    func run() async throws {
        let logger = try host.logger()
        if let workers, !ModelConfiguration.workerRange.contains(workers) { throw ValidationError("--workers must be from 1 to 256, got \(workers)") }
        var spec = ScoringJobSpec(input: input, output: output)
        spec.errors = errors
        spec.format = format
        spec.resume = resume
        spec.spanLines = spanLines
        spec.idField = idField
        let job: ScoringJob
        do {
            _ = try ModelBundle(directory: directory)
            job = try ScoringJob(spec: spec)
        } catch {
            _ = reportFailure(error)
            throw ExitCode(1)
        }
        // Ctrl-C and SIGTERM stop the job; finished spans stay journaled for --resume.
        let signals = [SIGINT, SIGTERM].map { number -> any DispatchSourceSignal in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            // The first stops the job (progress is saved); a second one, during the workers'
            // shutdown, ends the process at once.
            source.setEventHandler {
                job.cancel()
                signal(number, SIG_DFL)
            }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }

        let display = JobProgressDisplay(job: job)
        let outcome: Result<ScoringJobProgress, any Error> = await {
            do {
                return .success(try await withModel(at: directory, workers: workers, executor: executor, options: host.hostOptions(), logger: logger) { model in
                    try await withThrowingTaskGroup(of: ScoringJobProgress?.self) { group in
                        group.addTask { await display.run(); return nil }
                        let result = try await job.run(on: model)
                        group.cancelAll()
                        return result
                    }
                })
            } catch {
                return .failure(error)
            }
        }()
        display.finish()
        switch outcome {
        case .success(let progress):
            StandardStreams.err(
                "batch: done: \(progress.done) lines, \(progress.ok) ok, \(progress.failed) failed in \(String(format: "%.1f", progress.elapsed.inSeconds)) s "
                    + "(\(Int(progress.itemsPerSecond)) items/s)\(progress.resumed > 0 ? ", \(progress.resumed) resumed from an earlier run" : ""); "
                    + "output \(spec.output), errors \(spec.errorsPath)\n")
        case .failure(let error) where error is CancellationError || job.progress.state == .cancelled:
            let progress = job.progress
            StandardStreams.err("batch: interrupted at \(progress.done) lines; finished spans are saved in \(spec.jobDirectory); run again with --resume to continue\n")
            throw ExitCode(130)
        case .failure(let error):
            _ = reportFailure(error)
            StandardStreams.err("batch: finished spans are saved in \(spec.jobDirectory); fix the cause and run again with --resume\n")
            throw ExitCode(1)
        }
    }
}

/// The job's progress on standard error: a bar redrawn in place on a terminal, else a plain line
/// every two seconds (for logs).
final class JobProgressDisplay: Sendable {
    let job: ScoringJob
    let terminal = isatty(2) == 1

    init(job: ScoringJob) { self.job = job }

    func run() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: terminal ? .milliseconds(200) : .seconds(2))
            if Task.isCancelled { break }
            StandardStreams.err(terminal ? "\r" + line(job.progress, bar: true) : line(job.progress, bar: false) + "\n")
        }
    }

    func finish() {
        if terminal { StandardStreams.err("\r" + line(job.progress, bar: true) + "\n") }
    }

    private func line(_ p: ScoringJobProgress, bar: Bool) -> String {
        let total = p.lines.map { "/\($0)" } ?? ""
        var text = "batch: \(p.done)\(total) lines, \(p.ok) ok, \(p.failed) failed, \(Int(p.itemsPerSecond)) items/s"
        if let eta = p.eta { text += ", ETA \(Int(eta.rounded(.up)))s" }
        guard bar, p.bytesTotal > 0 else { return text }
        let fraction = min(1, Double(p.bytesDone) / Double(p.bytesTotal))
        let filled = Int(fraction * 30)
        return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: 30 - filled) + "] \(Int(fraction * 100))% " + text.dropFirst(7)
    }
}

extension ScoringJobFormat: ExpressibleByArgument {}
