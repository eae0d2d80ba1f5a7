import Foundation
import Testing
@testable import Sidecar

#if canImport(Glibc)
import Glibc
#endif

/// End to end with real Python worker processes over real gRPC on Unix sockets.
@Suite(.serialized) struct WorkerPoolTests {
    static let echo = ["handler.py": "def predict(batch):\n    return batch\n"]

    func withTestModel<R: Sendable>(
        _ files: [String: String], workers: Int = 1, _ body: (Model) async throws -> R
    ) async throws -> R {
        let dir = try Fixtures.model(files)
        return try await withModel(at: dir.path, workers: workers, options: Fixtures.hostOptions, logger: Fixtures.logger, body)
    }

    @Test func echoRoundTrip() async throws {
        try await withTestModel(Self.echo) { model in
            let answer = try await model.predict(Fixtures.json(#"{"x": [1, 2.5, "three"], "y": null}"#))
            let decoded = try JSONSerialization.jsonObject(with: answer.data) as! [String: Any]
            #expect((decoded["x"] as! [Any]).count == 3)
            #expect(decoded["y"] is NSNull)
            #expect(model.workers.first?.state == .ready)
            #expect(model.workers.first?.pythonVersion?.hasPrefix("3.") == true)
        }
    }

    /// The benchmarking executor answers every item with itself without starting Python: a handler
    /// that would raise never runs, and there are no worker processes.
    @Test func benchmarkEchoAnswersInSwiftWithoutWorkers() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(batch):\n    raise RuntimeError('must not run')\n"])
        var options = Fixtures.hostOptions
        options.benchmarkEcho = true
        try await withModel(at: dir.path, workers: 2, options: options, logger: Fixtures.logger) { model in
            let items = (0..<50).map { Fixtures.json(#"{"n": \#($0)}"#) }
            let results = try await model.predict(batch: items)
            #expect(try results.map { try $0.get().decode([String: Int].self)["n"] } == Array(0..<50))
            let tensor = Tensor(name: "x", datatype: .fp32, shape: [1, 2], data: Data([0, 0, 128, 63, 0, 0, 0, 64]))
            #expect(try await model.infer([tensor]).first?.data == tensor.data)
            #expect(model.workers.isEmpty)
            #expect(model.isReady)
            await #expect(throws: SidecarError.self) { try await model.scale(to: 3) }
        }
    }

    @Test func concurrentCallersEachGetTheirOwnAnswers() async throws {
        try await withTestModel(["handler.py": "def predict(batch):\n    return [{'twice': item['n'] * 2} for item in batch]\n"], workers: 2) { model in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for caller in 0..<200 {
                    group.addTask {
                        let items = (0..<(caller % 7 + 1)).map { Fixtures.json(#"{"n": \#(caller * 100 + $0)}"#) }
                        let results = try await model.predict(batch: items)
                        for (offset, result) in results.enumerated() {
                            let value = try result.get().decode([String: Int].self)
                            #expect(value["twice"] == (caller * 100 + offset) * 2)
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(model.workers.allSatisfy { $0.batchesServed > 0 }, "both workers served: \(model.workers)")
        }
    }

    @Test func classHandlerGetsContextPerWorker() async throws {
        let handler = """
            class Model:
                def __init__(self, context):
                    self.index = context.worker_index
                    self.scale = context.config["scale"]
                    self.name = context.model_name
                    assert (context.model_dir / "handler.py").exists()
                    context.logger.info("loaded")

                def predict(self, batch):
                    return [{"value": x * self.scale, "worker": self.index, "model": self.name} for x in batch]
            """
        try await withTestModel(["handler.py": handler, "sidecar.yaml": "handler: handler:Model\nconfig: {scale: 10}\n"]) { model in
            let out = try await model.predict(Fixtures.json("4")).decode([String: AnyCodable].self)
            #expect(out["value"]?.int == 40)
            #expect(out["worker"]?.int == 0)
            #expect(out["model"]?.string == model.name)
        }
    }

    @Test func asyncHandler() async throws {
        let handler = """
            import asyncio

            async def predict(batch):
                await asyncio.sleep(0.01)
                return [x + 1 for x in batch]
            """
        try await withTestModel(["handler.py": handler]) { model in
            let results = try await model.predict(batch: [Fixtures.json("1"), Fixtures.json("2")])
            #expect(try results.map { try $0.get().json } == ["2", "3"])
        }
    }

    @Test func handlerExceptionCarriesTracebackAndWorkerStaysUp() async throws {
        let handler = """
            def predict(batch):
                if any(item == "boom" for item in batch):
                    raise ValueError("cannot handle boom")
                return batch
            """
        try await withTestModel([("handler.py"): handler]) { model in
            let pid = model.workers[0].pid
            let error = await #expect(throws: PredictionError.self) { try await model.predict(Fixtures.json(#""boom""#)) }
            #expect(error?.kind == .handlerError)
            #expect(error?.type == "ValueError")
            #expect(error?.message == "cannot handle boom")
            #expect(error?.traceback?.contains("handler.py") == true)
            #expect(error?.traceback?.contains("line 3") == true)
            // The same worker keeps serving.
            let fine = try await model.predict(Fixtures.json(#""fine""#))
            #expect(fine.json == #""fine""#)
            #expect(model.workers[0].pid == pid)
        }
    }

    @Test func poisonItemIsIsolatedFromItsBatchMates() async throws {
        let handler = """
            def predict(batch):
                if "boom" in batch:
                    raise ValueError("cannot handle boom")
                return [x.upper() for x in batch]
            """
        try await withTestModel(["handler.py": handler]) { model in
            // One caller's batch.
            let words = ["a", "b", "c", "d", "boom", "f", "g", "h"]
            let results = try await model.predict(batch: words.map { Fixtures.json("\"\($0)\"") })
            for (word, result) in zip(words, results) {
                switch result {
                case .success(let value): #expect(word != "boom" && value.json == "\"\(word.uppercased())\"")
                case .failure(let error):
                    #expect(word == "boom")
                    #expect(error.type == "ValueError")
                    #expect(error.traceback?.contains("handler.py") == true)
                }
            }
            // Many callers whose items share batches: only the poison one fails.
            try await withThrowingTaskGroup(of: (String, Bool).self) { group in
                for n in 0..<40 {
                    let word = n == 17 ? "boom" : "w\(n)"
                    group.addTask { (word, (try? await model.predict(Fixtures.json("\"\(word)\""))) != nil) }
                }
                for try await (word, succeeded) in group { #expect(succeeded == (word != "boom"), "\(word)") }
            }
        }
    }

    @Test func wrongLengthIsAnErrorNotSilentLoss() async throws {
        try await withTestModel(["handler.py": "def predict(batch):\n    return batch[:-1]\n"]) { model in
            let results = try await model.predict(batch: [Fixtures.json("1"), Fixtures.json("2")])
            for result in results {
                guard case .failure(let error) = result else { Issue.record("a short return must fail every item"); continue }
                #expect(error.kind == .wrongLength)
                #expect(error.message.contains("1 results for a batch of 2"))
            }
        }
    }

    /// A handler's own exception named like a Sidecar error (`WrongLength`) is still the handler
    /// raising: the batch is bisected and only the raising item fails. The supervisor used to decide
    /// by the exception's class name and skipped poison isolation here.
    @Test func handlerExceptionNamedLikeASidecarErrorIsStillIsolated() async throws {
        let handler = """
            class WrongLength(Exception):
                pass

            def predict(batch):
                if "bad" in batch:
                    raise WrongLength("bad item in the batch")
                return batch
            """
        try await withTestModel(["handler.py": handler, "sidecar.yaml": "batching: {max_batch_size: 8}\n"]) { model in
            let results = try await model.predict(batch: ["a", "bad", "c"].map { Fixtures.json("\"\($0)\"") })
            #expect(try results[0].get().json == "\"a\"")
            #expect(try results[2].get().json == "\"c\"")
            guard case .failure(let error) = results[1] else { Issue.record("the raising item must fail"); return }
            #expect(error.kind == .handlerError)
            #expect(error.type == "WrongLength")
        }
    }

    /// A raising batch is isolated inside the worker (issue 20): one round trip answers every item,
    /// each raising item with its own exception, where the supervisor's bisection took a dozen.
    @Test func aRaisingBatchIsIsolatedInTheWorkerInOneRoundTrip() async throws {
        let handler = """
            def predict(batch):
                for item in batch:
                    if item % 17 == 5:
                        raise ValueError(f"item {item} is bad")
                return batch
            """
        try await withTestModel(["handler.py": handler, "sidecar.yaml": "batching: {max_batch_size: 64}\n"]) { model in
            let before = model.batchStatistics.batches
            let results = try await model.predict(batch: (0..<64).map { Fixtures.json("\($0)") })
            #expect(model.batchStatistics.batches - before == 1, "the worker answered the batch whole; the supervisor split nothing")
            for (item, result) in results.enumerated() {
                if item % 17 == 5 {
                    guard case .failure(let error) = result else { Issue.record("item \(item) must fail"); continue }
                    #expect(error.message == "item \(item) is bad" && error.kind == .handlerError)
                    #expect(error.traceback?.contains("ValueError") == true)
                } else {
                    #expect(try result.get().json == "\(item)")
                }
            }
        }
    }

    /// With `retry: false` no item runs twice: the worker does not isolate, every item gets the
    /// batch's error, and the handler saw each item once (it writes down what it ran).
    @Test func withoutRetryARaisingBatchRunsNoItemTwice() async throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-ran-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: log) }
        let handler = """
            def predict(batch):
                with open(\(String(reflecting: log.path)), "a") as ran:
                    ran.write("".join(f"{item}\\n" for item in batch))
                if 3 in batch:
                    raise ValueError("3 is bad")
                return batch
            """
        try await withTestModel(["handler.py": handler, "sidecar.yaml": "retry: false\nbatching: {max_batch_size: 16}\n"]) { model in
            let results = try await model.predict(batch: (0..<16).map { Fixtures.json("\($0)") })
            for result in results {
                guard case .failure(let error) = result else { Issue.record("every item gets the batch's error"); continue }
                #expect(error.message == "3 is bad")
            }
            let ran = try String(contentsOf: log, encoding: .utf8).split(separator: "\n")
            #expect(ran.count == 16 && Set(ran).count == 16, "each item ran once: \(ran)")
        }
    }

    /// An input the worker cannot decode is the caller's error (the front answers 400), not the model's.
    @Test func undecodableInputIsTheCallersError() async throws {
        try await withTestModel(["handler.py": "def predict(batch):\n    return batch\n"]) { model in
            let results = try await model.predict(batch: [Fixtures.json("1"), JSONValue(trusted: Data("not json".utf8))])
            #expect(try results[0].get().json == "1")
            guard case .failure(let error) = results[1] else { Issue.record("the undecodable item must fail"); return }
            #expect(error.kind == .invalidInput)
            #expect(error.type == "InvalidJSON")
        }
    }

    @Test func unserializableOutputFailsOnlyItsItem() async throws {
        let handler = "def predict(batch):\n    return [object() if x == 2 else x for x in batch]\n"
        try await withTestModel(["handler.py": handler]) { model in
            let results = try await model.predict(batch: [Fixtures.json("1"), Fixtures.json("2"), Fixtures.json("3")])
            #expect(try results[0].get().json == "1")
            #expect(try results[2].get().json == "3")
            guard case .failure(let error) = results[1] else { Issue.record("item 2 must fail"); return }
            #expect(error.kind == .invalidItem)
            #expect(error.type == "NotSerializable")
        }
    }

    @Test func numpyOutputsAreConverted() async throws {
        let handler = """
            import numpy as np

            def predict(batch):
                return [{"array": np.arange(3) * x, "scalar": np.float32(x) / 2, "int": np.int64(x)} for x in batch]
            """
        try await withTestModel(["handler.py": handler, "requirements.txt": "numpy\n"]) { model in
            let out = try await model.predict(Fixtures.json("2")).decode([String: AnyCodable].self)
            #expect(out["array"]?.array == [0, 2, 4])
            #expect(out["scalar"]?.double == 1.0)
            #expect(out["int"]?.int == 2)
        }
    }

    @Test func secondStartReusesTheEnvironment() async throws {
        let first = try await withTestModel(Self.echo) { $0.environment }
        let second = try await withTestModel(Self.echo) { $0.environment }
        #expect(first.directory == second.directory)
        #expect(second.wasBuilt == false)
    }

    @Test func killedWorkerIsReplacedAndModelKeepsAnswering() async throws {
        try await withTestModel(Self.echo, workers: 2) { model in
            let victim = try #require(model.workers[0].pid)
            #expect(kill(victim, SIGKILL) == 0)
            #expect(await eventually { model.workers[0].restarts == 1 && model.workers[0].state == .ready && model.workers[0].pid != victim })
            #expect(model.workers[0].lastError?.contains("signal 9") == true)
            for n in 0..<50 {
                #expect(try await model.predict(Fixtures.json("\(n)")).json == "\(n)")
            }
        }
    }

    @Test func workerKilledMidBatchLosesNothing() async throws {
        let handler = "import time\n\ndef predict(batch):\n    time.sleep(0.3)\n    return batch\n"
        try await withTestModel(["handler.py": handler], workers: 2) { model in
            let pids = model.workers.compactMap(\.pid)
            async let results = model.predict(batch: (0..<8).map { Fixtures.json("\($0)") })
            try await Task.sleep(for: .milliseconds(100))
            for pid in pids { kill(pid, SIGKILL) }  // both die mid-batch; replacements run it again
            #expect(try await results.map { try $0.get().json } == (0..<8).map { "\($0)" })
        }
    }

    @Test func handlerThatFailsToImportReportsTheTraceback() async throws {
        let dir = try Fixtures.model(["handler.py": "import json\nraise RuntimeError('weights missing')\n\ndef predict(b):\n    return b\n"])
        let error = await #expect(throws: SidecarError.self) {
            try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { _ in }
        }
        #expect(error?.code == .loadFailed)
        #expect(error?.message.contains("RuntimeError: weights missing") == true)
        #expect(error?.detail?.contains("handler.py\", line 2") == true)
    }

    @Test func missingEntryPointIsRefusedBeforeAnyWorkerStarts() async throws {
        let dir = try Fixtures.model(["handler.py": "def run(batch):\n    return batch\n"])
        let error = await #expect(throws: SidecarError.self) {
            try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { _ in }
        }
        #expect(error?.code == .invalidModel)
        #expect(error?.message.contains("handler.py: defines no top-level 'predict'") == true)
    }

    @Test func attributeMissingAtRuntimeIsNamedByTheWorker() async throws {
        // Bound only through a module __getattr__, so the static check steps aside and the worker's
        // import has the last word.
        let handler = "def __getattr__(name):\n    raise AttributeError(name)\n"
        let dir = try Fixtures.model(["handler.py": handler])
        let error = await #expect(throws: SidecarError.self) {
            try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { _ in }
        }
        #expect(error?.code == .loadFailed)
        #expect(error?.message.contains("predict") == true)
    }

    @Test func initRunsOnceAndCleanupRunsAtUnload() async throws {
        let dir = try Fixtures.model([
            "handler.py": "def predict(batch):\n    return batch\n",
            "init.sh": "echo ran >> \"$SIDECAR_MODEL_DIR/init.log\"\ntest -n \"$VIRTUAL_ENV\"\n",
            "cleanup.sh": "echo cleaned >> cleanup.log\n",
        ])
        for _ in 0..<2 {
            try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
                _ = try await model.predict(Fixtures.json("1"))
            }
        }
        let initLog = try String(contentsOf: dir.appendingPathComponent("init.log"), encoding: .utf8)
        #expect(initLog == "ran\n")
        let cleanupLog = try String(contentsOf: dir.appendingPathComponent("cleanup.log"), encoding: .utf8)
        #expect(cleanupLog == "cleaned\ncleaned\n")
    }

    @Test func unloadFinishesInFlightAndQueuedItems() async throws {
        let dir = try Fixtures.model([
            "handler.py": "import time\n\ndef predict(batch):\n    time.sleep(0.2)\n    return batch\n",
            "sidecar.yaml": "batching: {max_batch_size: 1}\n",
        ])
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let model = try await host.load(dir.path)
            // Four one-item batches for one worker: two in flight (the window), two queued.
            let pending = Task { try await model.predict(batch: (1...4).map { Fixtures.json("\($0)") }) }
            try await Task.sleep(for: .milliseconds(100))
            try await host.unload(model.name)
            let results = try await pending.value
            #expect(try results.map { try $0.get().json } == ["1", "2", "3", "4"])
            await #expect(throws: SidecarError.self) { try await model.predict(Fixtures.json("5")) }
        }
    }

    @Test func batchStuckPastTheGraceIsKilledAndItsCallerAnswered() async throws {
        let dir = try Fixtures.model([
            "handler.py": "import time\n\ndef predict(batch):\n    time.sleep(600)\n    return batch\n",
            "sidecar.yaml": "timeouts: {shutdown_grace_s: 1}\n",
        ])
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let model = try await host.load(dir.path)
            let pid = try #require(model.workers[0].pid)
            let stuck = Task { try await model.predict(Fixtures.json("1")) }
            try await Task.sleep(for: .milliseconds(300))
            let start = ContinuousClock.now
            try await host.unload(model.name)
            #expect(ContinuousClock.now - start < .seconds(10), "grace 1 s, then SIGTERM, then SIGKILL 2 s later")
            #expect(kill(pid, 0) != 0, "the worker process is gone")
            // The caller is answered (the item could not run anywhere), never left waiting.
            await #expect(throws: (any Error).self) { try await stuck.value }
        }
    }

    @Test func concurrentBuildsOfOneEnvironmentAreSerialized() async throws {
        let cache = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-lock-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: cache) }
        let bundle = try ModelBundle(directory: try Fixtures.model(Self.echo).path)
        let builder = EnvironmentBuilder(options: EnvironmentOptions(cacheDirectory: cache), logger: Fixtures.logger)
        async let first = builder.prepare(bundle)
        async let second = builder.prepare(bundle)
        let (a, b) = try await (first, second)
        #expect(a.directory == b.directory)
        #expect([a.wasBuilt, b.wasBuilt].filter { $0 }.count == 1, "exactly one of the two ran pip")
        #expect(FileManager.default.isExecutableFile(atPath: a.python.path))
    }

    @Test func offlineInstallFromAWheelhouseThroughPipArgs() async throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-offline-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let wheels = scratch.appendingPathComponent("wheels")
        // The wheelhouse an offline machine would be given (downloaded here, while the index is reachable).
        let download = try await ProcessRunner.run(
            "/usr/bin/python3.11",
            ["-m", "pip", "download", "-q", "-d", wheels.path, "-r", Fixtures.packageRoot.appendingPathComponent("python/runtime-requirements.txt").path, "six"],
            logger: Fixtures.logger, label: "pip download")
        try #require(download.succeeded, "pip download failed: \(download.lastLines.joined(separator: "\n"))")
        // A package that exists nowhere but in the wheelhouse: the build can only succeed if the pip
        // arguments reach pip.
        let probe = """
            import zipfile, sys
            with zipfile.ZipFile(sys.argv[1] + "/sidecar_offline_probe-0.1-py3-none-any.whl", "w") as w:
                w.writestr("sidecar_offline_probe/__init__.py", "VALUE = 'from the wheelhouse'\\n")
                w.writestr("sidecar_offline_probe-0.1.dist-info/METADATA", "Metadata-Version: 2.1\\nName: sidecar-offline-probe\\nVersion: 0.1\\n")
                w.writestr("sidecar_offline_probe-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
                w.writestr("sidecar_offline_probe-0.1.dist-info/RECORD", "")
            """
        let made = try await ProcessRunner.run("/usr/bin/python3.11", ["-c", probe, wheels.path], logger: Fixtures.logger, label: "wheel")
        try #require(made.succeeded, "\(made.lastLines)")
        let dir = try Fixtures.model([
            "handler.py": "import sidecar_offline_probe, six\n\ndef predict(batch):\n    return [sidecar_offline_probe.VALUE for x in batch]\n",
            "requirements.txt": "six\nsidecar-offline-probe==0.1\n",
        ])
        let options = HostOptions(environment: EnvironmentOptions(
            cacheDirectory: scratch.appendingPathComponent("cache"), pipArgs: ["--no-index", "--find-links", wheels.path]))
        let answer = try await withModel(at: dir.path, options: options, logger: Fixtures.logger) { model in
            try await model.predict(Fixtures.json("42"))
        }
        #expect(answer.json == #""from the wheelhouse""#)
    }

    @Test func cancelledCallerDoesNotDisturbOthers() async throws {
        let handler = "import time\n\ndef predict(batch):\n    time.sleep(0.2)\n    return batch\n"
        try await withTestModel(["handler.py": handler]) { model in
            async let blocker = model.predict(Fixtures.json("0"))
            try await Task.sleep(for: .milliseconds(50))
            let cancelled = Task { try await model.predict(Fixtures.json("1")) }
            try await Task.sleep(for: .milliseconds(20))
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            #expect(try await blocker.json == "0")
            #expect(try await model.predict(Fixtures.json("2")).json == "2")
        }
    }
}

/// Just enough of "any JSON" to read test outputs.
enum AnyCodable: Decodable, Equatable {
    case number(Double), string(String), array([Double]), other

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let n = try? container.decode(Double.self) { self = .number(n) }
        else if let s = try? container.decode(String.self) { self = .string(s) }
        else if let a = try? container.decode([Double].self) { self = .array(a) }
        else { self = .other }
    }

    var int: Int? { if case .number(let n) = self { return Int(n) }; return nil }
    var double: Double? { if case .number(let n) = self { return n }; return nil }
    var string: String? { if case .string(let s) = self { return s }; return nil }
    var array: [Int]? { if case .array(let a) = self { return a.map { Int($0) } }; return nil }
}
