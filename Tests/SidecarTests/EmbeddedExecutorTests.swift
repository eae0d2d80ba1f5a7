import Foundation
import Testing
@testable import Sidecar

/// The embedded executor with the real interpreter, in this test process. Every model here has no
/// requirements.txt, so all share the one environment the process's interpreter runs; a handler
/// whose thread is abandoned (stuck) gets a module name of its own, since its module stays imported.
@Suite(.serialized) struct EmbeddedExecutorTests {
    func withEmbedded<R: Sendable>(
        _ files: [String: String], name: String = "m", _ body: (Model) async throws -> R
    ) async throws -> R {
        let dir = try Fixtures.model(files, name: name)
        return try await withModel(at: dir.path, executor: .embedded, options: Fixtures.hostOptions, logger: Fixtures.logger, body)
    }

    @Test func echoRunsInThisProcess() async throws {
        try await withEmbedded(["handler.py": "import os\ndef predict(batch):\n    return [[item, os.getpid()] for item in batch]\n"]) { (model: Model) async throws in
            let answer = try await model.predict(Fixtures.json(#"{"x": [1, 2.5, "three"]}"#))
            let pair = try JSONSerialization.jsonObject(with: answer.data) as! [Any]
            #expect((pair[1] as! Int) == Int(getpid()))
            #expect(model.executorKind == .embedded)
            #expect(model.workers.count == 1)
            #expect(model.workers.first?.pid == getpid())
            #expect(model.workers.first?.pythonVersion?.hasPrefix("3.11") == true)
            let many = try await model.predict(batch: (0..<200).map { Fixtures.json("\($0)") })
            #expect(try many.map { try ($0.get().decode([Int].self))[0] } == Array(0..<200))
            #expect(model.workers.first?.itemsServed ?? 0 >= 201)
            await #expect(throws: SidecarError.self) { try await model.scale(to: 2) }
            try await model.scale(to: 1)
        }
    }

    /// The same handler answers the same items the same way in both executors: a class with its
    /// context, one item that raises (isolated by bisection), tensors through numpy.
    @Test func sameAnswersAsProcessWorkers() async throws {
        let files = [
            "handler.py": """
                import numpy as np
                class Handler:
                    def __init__(self, context):
                        self.name = context.model_name
                    def predict(self, items):
                        if any(isinstance(i, dict) and "x" in i for i in items):
                            return [{"y": np.asarray(i["x"]) * 2} for i in items]
                        if "boom" in items:
                            raise ValueError("boom in the batch")
                        return [[self.name, i] for i in items]
                """,
            "sidecar.yaml": "handler: handler:Handler\n",
        ]
        let dir = try Fixtures.model(files, name: "same")
        let items = [Fixtures.json("1"), Fixtures.json(#""boom""#), Fixtures.json(#"{"k": 3}"#)]
        let tensor = Tensor(name: "x", datatype: .fp32, shape: [2], data: Data([0, 0, 128, 63, 0, 0, 0, 64]))
        func answers(_ executor: ModelConfiguration.ExecutorKind) async throws -> ([String], [Tensor]) {
            try await withModel(at: dir.path, executor: executor, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
                let results = try await model.predict(batch: items).map { result -> String in
                    switch result {
                    case .success(let value): return value.json
                    case .failure(let error): return "\(error.kind) \(error.type): \(error.message)"
                    }
                }
                return (results, try await model.infer([tensor]))
            }
        }
        let process = try await answers(.process)
        let embedded = try await answers(.embedded)
        #expect(process.0 == [#"["same",1]"#, "handlerError ValueError: boom in the batch", #"["same",{"k":3}]"#])
        #expect(embedded.0 == process.0)
        #expect(embedded.1 == process.1)
        #expect(embedded.1.first?.data == Data([0, 0, 0, 64, 0, 0, 128, 64]))
    }

    @Test func asyncHandlerAndWrongLength() async throws {
        let handler = """
            import asyncio
            async def predict(items):
                await asyncio.sleep(0)
                return items if items != ["short"] else []
            """
        try await withEmbedded(["handler.py": handler]) { (model: Model) async throws in
            #expect(try await model.predict(Fixtures.json("7")).json == "7")
            let error = await #expect(throws: PredictionError.self) { try await model.predict(Fixtures.json(#""short""#)) }
            #expect(error?.kind == .wrongLength)
            #expect(try await model.predict(Fixtures.json("8")).json == "8")
        }
    }

    /// A handler looping in Python past batch_timeout_s gets TimeoutError raised in its thread; the
    /// model goes on serving.
    @Test func batchPastTimeoutIsInterrupted() async throws {
        let files = [
            "handler.py": "import time\ndef predict(items):\n    while items == ['slow']:\n        time.sleep(0.01)\n    return items\n",
            "sidecar.yaml": "timeouts: {batch_timeout_s: 0.5, ping_interval_s: 0.1, ping_timeout_s: 5}\n",
        ]
        try await withEmbedded(files) { (model: Model) async throws in
            let started = ContinuousClock.now
            let error = await #expect(throws: PredictionError.self) { try await model.predict(Fixtures.json(#""slow""#)) }
            #expect(error?.type == "TimeoutError")
            #expect(error?.message.contains("batch_timeout_s") == true)
            #expect(ContinuousClock.now - started < .seconds(4))
            #expect(try await model.predict(Fixtures.json("1")).json == "1")
            #expect(model.state == .ready)
        }
    }

    /// Blocked in C (no bytecode runs, so the interrupt cannot land): the model is FAILED with the
    /// reason and refuses at once, while a process-mode model of the same host keeps serving.
    @Test func stuckInNativeCodeFailsOnlyThatModel() async throws {
        let stuck = try Fixtures.model([
            "stuck_c.py": "import ctypes\ndef predict(items):\n    ctypes.CDLL(None).sleep(8)\n    return items\n",
            "sidecar.yaml": "handler: stuck_c:predict\ntimeouts: {batch_timeout_s: 0.3, ping_interval_s: 0.1, ping_timeout_s: 1}\n",
        ], name: "stuck-\(UInt32.random(in: 0...UInt32.max))")
        let other = try Fixtures.model(["handler.py": "def predict(items):\n    return items\n"], name: "other")
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let embedded = try await host.load(stuck.path, executor: .embedded)
            let process = try await host.load(other.path)
            let error = await #expect(throws: (any Error).self) { try await embedded.predict(Fixtures.json("1")) }
            #expect("\(error!)".contains("stuck in native code"))
            guard case .failed(let failure) = embedded.state else {
                Issue.record("expected FAILED, got \(embedded.state)")
                return
            }
            #expect(failure.message.contains("batch_timeout_s"))
            #expect(!embedded.isReady)
            let started = ContinuousClock.now
            await #expect(throws: SidecarError.self) { try await embedded.predict(Fixtures.json("2")) }
            #expect(ContinuousClock.now - started < .milliseconds(200))
            #expect(try await process.predict(Fixtures.json("3")).json == "3")
        }
    }

    /// A handler holding the GIL in C: no thread can take it, the pings say so, the model is FAILED.
    @Test func gilHeldFailsTheModel() async throws {
        let files = [
            "gil_holder.py": "import ctypes\ndef predict(items):\n    ctypes.PyDLL(None).sleep(4)\n    return items\n",
            "sidecar.yaml": "handler: gil_holder:predict\ntimeouts: {batch_timeout_s: 60, ping_interval_s: 0.1, ping_timeout_s: 1}\n",
        ]
        try await withEmbedded(files, name: "gil-\(UInt32.random(in: 0...UInt32.max))") { (model: Model) async throws in
            let error = await #expect(throws: (any Error).self) { try await model.predict(Fixtures.json("1")) }
            #expect("\(error!)".contains("GIL"))
            #expect(model.state != .ready)
        }
        // Once the call returns, the interpreter serves again.
        try await Task.sleep(for: .seconds(4))
    }

    /// `--workers 2` (or the admin API's workers) for an embedded model names what was asked.
    @Test func severalWorkersAskedForAnEmbeddedModelIsRefused() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(items):\n    return items\n", "sidecar.yaml": "executor: embedded\n"])
        let error = await #expect(throws: SidecarError.self) {
            try await withModel(at: dir.path, workers: 2, options: Fixtures.hostOptions, logger: Fixtures.logger) { _ in }
        }
        #expect(error?.message.contains("cannot have the 2 workers asked for") == true)
    }

    @Test func importErrorNamesFileAndLine() async throws {
        let dir = try Fixtures.model(["handler.py": "x = 1\nraise RuntimeError('bad import')\ndef predict(items):\n    return items\n"])
        let error = await #expect(throws: SidecarError.self) {
            try await withModel(at: dir.path, executor: .embedded, options: Fixtures.hostOptions, logger: Fixtures.logger) { _ in }
        }
        #expect(error?.code == .loadFailed)
        #expect(error?.message.contains("RuntimeError: importing module 'handler' raised RuntimeError: bad import") == true)
        #expect(error?.detail?.contains("handler.py\", line 2") == true)
    }

    /// A reload imports the handler's code afresh (its modules were forgotten at unload).
    @Test func reloadRunsNewCode() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(items):\n    return ['v1' for _ in items]\n"], name: "reloaded")
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let first = try await host.load(dir.path, executor: .embedded)
            #expect(try await first.predict(Fixtures.json("0")).json == #""v1""#)
            // A longer file: Python's bytecode cache trusts an unchanged size and mtime second.
            try "def predict(items):\n    return ['v2' for item in items]\n".write(
                to: dir.appendingPathComponent("handler.py"), atomically: true, encoding: .utf8)
            let second = try await host.reload("reloaded")
            #expect(second.executorKind == .embedded)
            #expect(try await second.predict(Fixtures.json("0")).json == #""v2""#)
        }
    }

    /// A crash record left by a dead server sends the model to process workers, until a reload.
    @Test func crashRecordFallsBackToProcessWorkers() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(items):\n    return items\n"], name: "crashed-\(UInt32.random(in: 0...UInt32.max))")
        let name = dir.lastPathComponent
        let directory = CrashRecord.directory(cache: Fixtures.cacheDirectory)
        do {
            let (record, crash) = try CrashRecord.open(directory: directory, model: name)
            #expect(crash == nil)
            record?.running(batch: 41, items: 3)
        }  // released without clear(): as a crash leaves it
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let model = try await host.load(dir.path, executor: .embedded)
            #expect(model.executorKind == .process)
            #expect(model.executorNote?.contains("batch 41 (3 items)") == true)
            #expect(model.workers.first?.pid != getpid())
            #expect(try await model.predict(Fixtures.json("5")).json == "5")
            let reloaded = try await host.reload(name)
            #expect(reloaded.executorKind == .embedded)
            #expect(reloaded.workers.first?.pid == getpid())
        }
        let (_, after) = try CrashRecord.open(directory: directory, model: name)
        #expect(after == nil)
    }
}

@Suite struct EmbeddedRulesTests {
    @Test func crashRecordIsLockedAndRemembersTheBatch() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-crumbs-\(UUID().uuidString.prefix(8))")
        var (first, none) = try CrashRecord.open(directory: directory, model: "a")
        #expect(none == nil)
        first?.running(batch: 9, items: 2)
        let (second, _) = try CrashRecord.open(directory: directory, model: "a")
        #expect(first != nil && second == nil)  // held by the first
        withExtendedLifetime(first) {}
        first = nil  // released mid-batch, as a crash leaves it
        var (third, crash) = try CrashRecord.open(directory: directory, model: "a")
        #expect(crash?.batch == 9 && crash?.items == 2 && crash?.pid == getpid())
        third?.clear()
        third = nil
        let (fourth, cleared) = try CrashRecord.open(directory: directory, model: "a")
        #expect(fourth != nil && cleared == nil)
    }

    @Test func admissionRefusesAnotherEnvironmentAndAClashingModule() throws {
        let interpreter = EmbeddedInterpreter()
        let env = URL(fileURLWithPath: "/tmp/env-a")
        try interpreter.admit(model: "a", environment: env, module: "handler")
        let otherEnv = #expect(throws: SidecarError.self) { try interpreter.admit(model: "b", environment: URL(fileURLWithPath: "/tmp/env-b"), module: "b") }
        #expect(otherEnv?.message.contains("model 'a'") == true)
        #expect(otherEnv?.message.contains("executor: process") == true)
        let clash = #expect(throws: SidecarError.self) { try interpreter.admit(model: "c", environment: env, module: "handler") }
        #expect(clash?.message.contains("top-level module named 'handler'") == true)
        try interpreter.admit(model: "d", environment: env, module: "d_handler")
        interpreter.dismiss(model: "a")
        try interpreter.admit(model: "c", environment: env, module: "handler")
        #expect(interpreter.models == ["c", "d"])
    }

    @Test func embeddedWithSeveralWorkersIsAConfigurationError() throws {
        let many = #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: "executor: embedded\nworkers: 2\n", file: "sidecar.yaml", defaultName: "m") }
        #expect(many?.message.contains("set workers: 1 or use executor: process") == true)
        let scaling = #expect(throws: SidecarError.self) {
            try ModelConfiguration.parse(yaml: "executor: embedded\nworkers: {min: 1, max: 3}\n", file: "sidecar.yaml", defaultName: "m")
        }
        #expect(scaling?.message.contains("autoscale") == true)
        let unknown = #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: "executor: thread\n", file: "sidecar.yaml", defaultName: "m") }
        #expect(unknown?.message.contains("one of process, embedded") == true)
        #expect(try ModelConfiguration.parse(yaml: "executor: embedded\n", file: "sidecar.yaml", defaultName: "m").executor == .embedded)
    }
}
