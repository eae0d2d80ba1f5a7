import ArgumentParser
import Foundation
import Logging
import Sidecar
import Subprocess

#if canImport(System)
import System
#else
import SystemPackage
#endif

/// Throughput and latency of models through the library API, beside the same handler in a plain
/// Python loop (the ceiling). Build with `-c release`; see docs/benchmarks.md.
@main
struct Benchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sidecar-bench",
        abstract: "Items per second and per-item p50/p99 through the library API, beside a plain Python loop.",
        discussion: """
            swift run -c release sidecar-bench            # echo and iris: 1 and 2 workers, embedded, the plain loop

            One process has one embedded interpreter, on one model's environment: with several models and \
            the embedded executor, each model is measured in a child sidecar-bench of its own.
            """)

    @Option(help: "Models to measure: name=directory=item JSON, separated by ';'.")
    var models = #"echo=Examples/echo={"x": 1.5, "id": 7};iris=Examples/iris=[5.1, 3.5, 1.4, 0.2]"#

    @Option(help: "Worker counts, comma-separated.")
    var workers = "1,2"

    @Option(help: "Executors, comma-separated: process (the worker counts above), embedded (one thread in this process).")
    var executors = "process,embedded"

    @Option(help: "Items per predict call, comma-separated.")
    var batchSizes = "1,16,128,1024"

    @Option(help: "Seconds measured per configuration (after a warm-up).")
    var seconds: Double = 3

    @Option(help: "Items kept outstanding by the concurrent callers (callers = this / batch size, 4 to 256).")
    var outstanding = 8192

    @Option(help: "Environment cache directory (default ~/.cache/sidecar).")
    var cacheDir: String?

    func run() async throws {
        var logger = Logger(label: "sidecar-bench") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .warning
        let options = HostOptions(environment: EnvironmentOptions(cacheDirectory: cacheDir.map { URL(fileURLWithPath: $0) }))
        let sizes = batchSizes.split(separator: ",").compactMap { Int($0) }
        let workerCounts = workers.split(separator: ",").compactMap { Int($0) }

        let kinds = try executors.split(separator: ",").map { text -> ModelConfiguration.ExecutorKind in
            guard let kind = ModelConfiguration.ExecutorKind(rawValue: String(text)) else { throw ValidationError("--executors: unknown '\(text)'") }
            return kind
        }
        let specs = models.split(separator: ";").map(String.init)
        if kinds.contains(.embedded), specs.count > 1 {
            for spec in specs { try Self.runChild(arguments: CommandLine.arguments, models: spec) }
            return
        }
        print("Sidecar benchmark — \(Date().formatted(.iso8601)), \(ProcessInfo.processInfo.activeProcessorCount) cores, \(Self.cpuModel())")
        print("""
            items/call: items per predict(batch:) call; callers: concurrent callers (\(outstanding) / items per call, 4…256); \
            mean batch: items per batch sent to a worker (smart batching merges calls up to max_batch_size); \
            p50/p99: latency of the call that carried the item; loop: the same handler in a plain Python loop in one \
            process over batches of the size the row's warm-up formed, handler alone and with JSON decode/encode, measured \
            right before and right after the row (the host's speed drifts); ÷: Sidecar's items/s over the mean of the two; \
            CPU µs/batch: CPU time per batch formed, of this process (embedded: Python included) and of the worker processes.

            """)
        for spec in specs {
            let parts = spec.split(separator: "=", maxSplits: 2).map(String.init)
            guard parts.count == 3 else { throw ValidationError("--models entry must be name=directory=item: \(spec)") }
            let (name, directory) = (parts[0], parts[1])
            let item = try JSONValue(json: parts[2])
            print("## \(name) (\(directory)), item \(item.json)")
            var rows: [(label: String, batch: Int, result: Measurement)] = []
            var configurations: [(label: String, workers: Int?, executor: ModelConfiguration.ExecutorKind)] = []
            if kinds.contains(.process) { configurations += workerCounts.map { ("\($0) process", $0, .process) } }
            if kinds.contains(.embedded) { configurations.append(("embedded", nil, .embedded)) }
            var ceiling: CeilingProcess?
            defer { ceiling?.close() }
            let bundle = try ModelBundle(directory: directory)
            for configuration in configurations {
                try await withModel(at: directory, workers: configuration.workers, executor: configuration.executor, options: options, logger: logger) { model in
                    if ceiling == nil { ceiling = try CeilingProcess(environment: model.environment, bundle: bundle, item: item, seconds: min(seconds, 2)) }
                    let loop = ceiling!
                    // A lone caller with one item: the latency of a call with nothing else going on.
                    rows.append((configuration.label, 1, try await Self.measure(model: model, item: item, batch: 1, callers: 1, seconds: seconds, ceiling: loop)))
                    for size in sizes {
                        let callers = max(4, min(256, outstanding / size))
                        rows.append((configuration.label, size, try await Self.measure(model: model, item: item, batch: size, callers: callers, seconds: seconds, ceiling: loop)))
                    }
                }
            }
            print(Self.row([
                "executor", "items/call", "callers", "mean batch", "items/s", "p50 ms", "p99 ms", "CPU µs/batch: server", "workers",
                "loop: handler (before/after)", "loop: +JSON (before/after)", "÷ handler", "÷ +JSON",
            ]))
            print(Self.row(Array(repeating: "---", count: 13)))
            for row in rows {
                let r = row.result
                let (before, after) = (r.ceilingBefore, r.ceilingAfter)
                let handler = (before.handler + after.handler) / 2
                let codec = (before.codec + after.codec) / 2
                print(Self.row([
                    row.label, "\(row.batch)", "\(r.callers)", String(format: "%.0f", r.meanBatch), Self.format(r.itemsPerSecond),
                    String(format: "%.3f", r.p50), String(format: "%.3f", r.p99),
                    String(format: "%.0f", r.serverCPUPerBatch), r.workerCPUPerBatch.map { String(format: "%.0f", $0) } ?? "-",
                    "\(Self.format(before.handler)) / \(Self.format(after.handler))", "\(Self.format(before.codec)) / \(Self.format(after.codec))",
                    String(format: "%.2f", r.itemsPerSecond / handler), String(format: "%.2f", r.itemsPerSecond / codec),
                ]))
            }
            print("")
        }
    }

    struct Measurement {
        var callers: Int
        var meanBatch: Double
        var itemsPerSecond: Double
        var p50: Double
        var p99: Double
        /// CPU time of this process (the server: front-less, the library API) per batch formed, µs.
        var serverCPUPerBatch: Double
        /// CPU time of the worker processes per batch, µs (nil: embedded, no workers).
        var workerCPUPerBatch: Double?
        /// The plain loop at the batch size the warm-up formed, right before and right after.
        var ceilingBefore: CeilingLine
        var ceilingAfter: CeilingLine
    }

    static func measure(
        model: Model, item: JSONValue, batch: Int, callers: Int, seconds: Double, ceiling: CeilingProcess
    ) async throws -> Measurement {
        let items = Array(repeating: item, count: batch)
        // Warm up: fill the pipes, let the workers' allocators settle; it also shows the batch size
        // this load forms, at which the plain loop is measured right before and right after.
        let warming = model.batchStatistics
        _ = try await run(model: model, items: items, callers: callers, for: .milliseconds(300))
        let warmed = model.batchStatistics
        let formed = max(1, Int((Double(warmed.items - warming.items) / Double(max(1, warmed.batches - warming.batches))).rounded()))
        let ceilingBefore = try ceiling.rate(batch: formed)
        let before = model.batchStatistics
        let workerPIDs = model.workers.compactMap(\.pid).filter { $0 != getpid() }
        let (server0, workers0) = (Self.cpuSeconds(of: getpid()), workerPIDs.map(Self.cpuSeconds).reduce(0, +))
        let start = ContinuousClock.now
        let latencies = try await run(model: model, items: items, callers: callers, for: .milliseconds(Int(seconds * 1000)))
        let elapsed = (ContinuousClock.now - start).inSeconds
        let (server1, workers1) = (Self.cpuSeconds(of: getpid()), workerPIDs.map(Self.cpuSeconds).reduce(0, +))
        let ceilingAfter = try ceiling.rate(batch: formed)
        let sorted = latencies.sorted()
        func percentile(_ p: Double) -> Double { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] * 1000 }
        let after = model.batchStatistics
        let meanBatch = Double(after.items - before.items) / Double(max(1, after.batches - before.batches))
        let batches = Double(max(1, after.batches - before.batches))
        return Measurement(
            callers: callers, meanBatch: meanBatch, itemsPerSecond: Double(latencies.count * batch) / elapsed, p50: percentile(0.5), p99: percentile(0.99),
            serverCPUPerBatch: (server1 - server0) * 1e6 / batches, workerCPUPerBatch: workerPIDs.isEmpty ? nil : (workers1 - workers0) * 1e6 / batches,
            ceilingBefore: ceilingBefore, ceilingAfter: ceilingAfter)
    }

    /// User + system CPU seconds of process `pid`, from /proc (0 if it is gone).
    static func cpuSeconds(of pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")")
        else { return 0 }
        // Fields after the command name: state is field 3, utime 14, stime 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Runs this benchmark again in a child process for one model (its own embedded interpreter).
    static func runChild(arguments: [String], models: String) throws {
        var rest: [String] = []
        var skip = false
        for argument in arguments.dropFirst() {
            if skip { skip = false; continue }
            if argument == "--models" { skip = true; continue }
            if argument.hasPrefix("--models=") { continue }
            rest.append(argument)
        }
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        child.arguments = rest + ["--models", models]
        fflush(nil)
        try child.run()
        child.waitUntilExit()
        guard child.terminationStatus == 0 else { throw ExitCode(child.terminationStatus) }
    }

    /// Runs `callers` concurrent loops of `predict(batch:)` until `duration` has passed; returns each
    /// call's latency in seconds.
    static func run(model: Model, items: [JSONValue], callers: Int, for duration: Duration) async throws -> [Double] {
        let deadline = ContinuousClock.now.advanced(by: duration)
        return try await withThrowingTaskGroup(of: [Double].self) { group in
            for _ in 0..<callers {
                group.addTask {
                    var latencies: [Double] = []
                    while ContinuousClock.now < deadline {
                        let start = ContinuousClock.now
                        let results = try await model.predict(batch: items)
                        latencies.append((ContinuousClock.now - start).inSeconds)
                        if case .failure(let error) = results[0] { throw error }
                    }
                    return latencies
                }
            }
            var all: [Double] = []
            for try await part in group { all += part }
            return all
        }
    }

    struct CeilingLine: Decodable {
        var batch: Int
        var handler: Double
        var codec: Double
    }

    static func row(_ cells: [String]) -> String { "| " + cells.joined(separator: " | ") + " |" }

    static func format(_ rate: Double) -> String {
        rate >= 1_000_000 ? String(format: "%.2f M", rate / 1_000_000) : rate >= 1000 ? String(format: "%.1f k", rate / 1000) : String(format: "%.0f", rate)
    }

    static func cpuModel() -> String {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = info.split(separator: "\n").first(where: { $0.hasPrefix("model name") })
        else { return "unknown CPU" }
        return line.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
    }
}

/// scripts/bench_ceiling.py --serve in the model's own environment: the same handler in a plain
/// Python loop, asked for one batch size at a time so that each row is bracketed by it.
final class CeilingProcess {
    private let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private var buffer = Data()

    init(environment: PythonEnvironment, bundle: ModelBundle, item: JSONValue, seconds: Double) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/bench_ceiling.py")
        process.executableURL = environment.python
        process.arguments = [
            script.path, "--serve", "--model-dir", bundle.directory.path, "--handler", bundle.configuration.handler, "--item", item.json,
            "--seconds", "\(seconds)", "--config-json", bundle.configuration.handlerConfig.json,
        ]
        process.currentDirectoryURL = bundle.directory
        process.standardInput = input
        process.standardOutput = output
        try process.run()
    }

    /// Blocks while the loop runs (the benchmark's model is idle meanwhile).
    func rate(batch: Int) throws -> Benchmark.CeilingLine {
        input.fileHandleForWriting.write(Data("\(batch)\n".utf8))
        while !buffer.contains(UInt8(ascii: "\n")) {
            let chunk = output.fileHandleForReading.availableData
            guard !chunk.isEmpty else { throw ValidationError("bench_ceiling.py ended early (see its error above)") }
            buffer.append(chunk)
        }
        let end = buffer.firstIndex(of: UInt8(ascii: "\n"))!
        let line = buffer[buffer.startIndex..<end]
        buffer = Data(buffer[buffer.index(after: end)...])
        return try JSONDecoder().decode(Benchmark.CeilingLine.self, from: line)
    }

    func close() {
        try? input.fileHandleForWriting.close()
        process.waitUntilExit()
    }
}
