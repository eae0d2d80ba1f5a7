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
            process over batches of the mean batch size, handler alone and with JSON decode/encode; ÷: Sidecar's items/s \
            over that loop's.

            """)
        for spec in specs {
            let parts = spec.split(separator: "=", maxSplits: 2).map(String.init)
            guard parts.count == 3 else { throw ValidationError("--models entry must be name=directory=item: \(spec)") }
            let (name, directory) = (parts[0], parts[1])
            let item = try JSONValue(json: parts[2])
            print("## \(name) (\(directory)), item \(item.json)")
            var rows: [(label: String, batch: Int, result: Measurement)] = []
            var environment: PythonEnvironment?
            var configurations: [(label: String, workers: Int?, executor: ModelConfiguration.ExecutorKind)] = []
            if kinds.contains(.process) { configurations += workerCounts.map { ("\($0) process", $0, .process) } }
            if kinds.contains(.embedded) { configurations.append(("embedded", nil, .embedded)) }
            for configuration in configurations {
                try await withModel(at: directory, workers: configuration.workers, executor: configuration.executor, options: options, logger: logger) { model in
                    environment = model.environment
                    // A lone caller with one item: the latency of a call with nothing else going on.
                    rows.append((configuration.label, 1, try await Self.measure(model: model, item: item, batch: 1, callers: 1, seconds: seconds)))
                    for size in sizes {
                        let callers = max(4, min(256, outstanding / size))
                        rows.append((configuration.label, size, try await Self.measure(model: model, item: item, batch: size, callers: callers, seconds: seconds)))
                    }
                }
            }
            guard let environment else { continue }
            // The ceiling, measured at the batch sizes Sidecar actually formed ("the same batches").
            let bundle = try ModelBundle(directory: directory)
            let formed = Set(rows.map { max(1, Int($0.result.meanBatch.rounded())) }).sorted()
            let ceilings = Dictionary(
                uniqueKeysWithValues: try await Self.ceiling(environment: environment, bundle: bundle, item: item, sizes: formed, seconds: min(seconds, 2))
                    .map { ($0.batch, $0) })
            print(Self.row([
                "executor", "items/call", "callers", "mean batch", "items/s", "p50 ms", "p99 ms", "CPU µs/batch: server", "workers",
                "loop: handler", "loop: +JSON", "÷ handler", "÷ +JSON",
            ]))
            print(Self.row(Array(repeating: "---", count: 13)))
            for row in rows {
                let r = row.result
                let ceiling = ceilings[max(1, Int(r.meanBatch.rounded()))]
                print(Self.row([
                    row.label, "\(row.batch)", "\(r.callers)", String(format: "%.0f", r.meanBatch), Self.format(r.itemsPerSecond),
                    String(format: "%.3f", r.p50), String(format: "%.3f", r.p99),
                    String(format: "%.0f", r.serverCPUPerBatch), r.workerCPUPerBatch.map { String(format: "%.0f", $0) } ?? "-",
                    ceiling.map { Self.format($0.handler) } ?? "-", ceiling.map { Self.format($0.codec) } ?? "-",
                    ceiling.map { String(format: "%.2f", r.itemsPerSecond / $0.handler) } ?? "-",
                    ceiling.map { String(format: "%.2f", r.itemsPerSecond / $0.codec) } ?? "-",
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
    }

    static func measure(model: Model, item: JSONValue, batch: Int, callers: Int, seconds: Double) async throws -> Measurement {
        let items = Array(repeating: item, count: batch)
        // Warm up: fill the pipes, let the workers' allocators settle.
        _ = try await run(model: model, items: items, callers: callers, for: .milliseconds(300))
        let before = model.batchStatistics
        let workerPIDs = model.workers.compactMap(\.pid).filter { $0 != getpid() }
        let (server0, workers0) = (Self.cpuSeconds(of: getpid()), workerPIDs.map(Self.cpuSeconds).reduce(0, +))
        let start = ContinuousClock.now
        let latencies = try await run(model: model, items: items, callers: callers, for: .milliseconds(Int(seconds * 1000)))
        let elapsed = (ContinuousClock.now - start).inSeconds
        let (server1, workers1) = (Self.cpuSeconds(of: getpid()), workerPIDs.map(Self.cpuSeconds).reduce(0, +))
        let sorted = latencies.sorted()
        func percentile(_ p: Double) -> Double { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] * 1000 }
        let after = model.batchStatistics
        let meanBatch = Double(after.items - before.items) / Double(max(1, after.batches - before.batches))
        let batches = Double(max(1, after.batches - before.batches))
        return Measurement(
            callers: callers, meanBatch: meanBatch, itemsPerSecond: Double(latencies.count * batch) / elapsed, p50: percentile(0.5), p99: percentile(0.99),
            serverCPUPerBatch: (server1 - server0) * 1e6 / batches, workerCPUPerBatch: workerPIDs.isEmpty ? nil : (workers1 - workers0) * 1e6 / batches)
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

    /// Runs scripts/bench_ceiling.py in the model's own environment.
    static func ceiling(environment: PythonEnvironment, bundle: ModelBundle, item: JSONValue, sizes: [Int], seconds: Double) async throws -> [CeilingLine] {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/bench_ceiling.py")
        let result = try await Subprocess.run(
            .path(FilePath(environment.python.path)),
            arguments: [
                script.path, "--model-dir", bundle.directory.path, "--handler", bundle.configuration.handler, "--item", item.json,
                "--batch-sizes", sizes.map(String.init).joined(separator: ","), "--seconds", "\(seconds)",
                "--config-json", bundle.configuration.handlerConfig.json,
            ],
            workingDirectory: FilePath(bundle.directory.path),
            output: .string(limit: 1 << 20),
            error: .string(limit: 1 << 20))
        guard result.terminationStatus.isSuccess else {
            throw ValidationError("bench_ceiling.py failed: \(result.standardError)")
        }
        let text = result.standardOutput
        return try text.split(separator: "\n").map { try JSONDecoder().decode(CeilingLine.self, from: Data($0.utf8)) }
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
