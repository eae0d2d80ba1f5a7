import Foundation
import Testing
@testable import Sidecar

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor against real misbehaving Python processes: crashes, hangs, stuck batches, crash
/// loops, recycling, deadlines.
@Suite(.serialized) struct SupervisionTests {
    /// Echoes items; "crash" kills the process, "hang" never returns, "sleep" takes 0.5 s.
    static let faulty = """
        import os, time
        from pathlib import Path

        if (Path(__file__).parent / "BROKEN").exists():
            raise ImportError("BROKEN flag present")

        def predict(batch):
            if "crash" in batch:
                os._exit(17)
            if "hang" in batch:
                time.sleep(10**6)
            if "sleep" in batch:
                time.sleep(0.5)
            return batch
        """

    func load(_ host: ModelHost, yaml: String, name: String = "m") async throws -> (Model, URL) {
        let dir = try Fixtures.model(["handler.py": Self.faulty, "sidecar.yaml": yaml], name: name)
        return (try await host.load(dir.path), dir)
    }

    func strings(_ values: [String]) -> [JSONValue] { values.map { Fixtures.json("\"\($0)\"") } }

    @Test func itemThatCrashesItsWorkerFailsAloneAndTheModelStaysUp() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            // A breaker of 2 would trip at once if crashes while running a batch counted.
            let yaml = "workers: 2\nbatching: {max_batch_size: 16}\nrestart_policy: {max_failures: 2}\n"
            let (model, _) = try await load(host, yaml: yaml)
            var items = (0..<16).map { "item\($0)" }
            items[11] = "crash"
            let results = try await model.predict(batch: strings(items))
            for (index, result) in results.enumerated() {
                if index == 11 {
                    guard case .failure(let error) = result else { Issue.record("the crashing item must fail"); continue }
                    #expect(error.kind == .workerDied)
                    #expect(error.message.contains("likely what kills the worker"))
                } else {
                    #expect(try result.get().json == "\"item\(index)\"")
                }
            }
            #expect(await eventually { model.state == .ready }, "not FAILED: the crashes were the item's doing")
            #expect(try await model.predict(Fixtures.json("1")).json == "1")
        }
    }

    @Test func stoppedWorkerIsDeclaredHungAndItsBatchRunsElsewhere() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let yaml = "timeouts: {ping_interval_s: 0.2, ping_timeout_s: 1}\n"
            let (model, _) = try await load(host, yaml: yaml)
            let pid = try #require(model.workers[0].pid)
            let pending = Task { try await model.predict(Fixtures.json("\"sleep\"")) }
            #expect(await eventually { model.workers[0].state == .busy })
            kill(pid, SIGSTOP)
            let start = ContinuousClock.now
            #expect(try await pending.value.json == "\"sleep\"")
            #expect(ContinuousClock.now - start < .seconds(15))
            // (On a slow machine the batch may have finished before SIGSTOP landed; the stopped
            // worker is then declared hung while idle. Either way it is found and replaced.)
            #expect(await eventually { model.workers[0].restarts == 1 }, "\(model.workers[0])")
            #expect(model.workers[0].lastError?.contains("hung: no answer to pings") == true)
            #expect(kill(pid, 0) != 0 || Self.isZombie(pid), "the stopped process was killed")
        }
    }

    @Test func batchPastBatchTimeoutIsKilledAndOnlyTheStuckItemFails() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let yaml = "max_retries: 1\ntimeouts: {batch_timeout_s: 1}\nbatching: {max_batch_size: 8}\n"
            let (model, _) = try await load(host, yaml: yaml)
            let results = try await model.predict(batch: strings(["a", "hang", "b"]))
            #expect(try results[0].get().json == "\"a\"")
            #expect(try results[2].get().json == "\"b\"")
            guard case .failure(let error) = results[1] else { Issue.record("the stuck item must fail"); return }
            #expect(error.message.contains("batch_timeout_s"))
            #expect(await eventually { model.state == .ready })
        }
    }

    @Test func crashLoopMarksTheModelFailedOthersServeAndReloadBringsItBack() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let yaml = "restart_policy: {max_failures: 2, window_s: 60}\n"
            let (model, dir) = try await load(host, yaml: yaml)
            let (other, _) = try await load(host, yaml: "", name: "other")
            try "".write(to: dir.appendingPathComponent("BROKEN"), atomically: true, encoding: .utf8)
            kill(try #require(model.workers[0].pid), SIGKILL)  // failure 1; the restart fails to import: 2
            #expect(await eventually { if case .failed = model.state { return true } else { return false } })
            guard case .failed(let error) = model.state else { return }
            #expect(error.message.contains("FAILED"))
            #expect(error.message.contains("BROKEN flag present"))
            #expect(error.detail?.contains("ImportError") == true)
            #expect(!model.isReady)
            let start = ContinuousClock.now
            let refused = await #expect(throws: SidecarError.self) { try await model.predict(Fixtures.json("1")) }
            #expect(refused?.code == .unavailable)
            #expect(ContinuousClock.now - start < .seconds(1), "refused at once")
            #expect(try await other.predict(Fixtures.json("2")).json == "2", "the other model is untouched")

            try FileManager.default.removeItem(at: dir.appendingPathComponent("BROKEN"))
            let reloaded = try await host.reload(model.name)
            #expect(reloaded.state == .ready)
            #expect(try await reloaded.predict(Fixtures.json("3")).json == "3")
        }
    }

    /// A reload loads the model with what it was loaded with: `scale` turned autoscaling off, the
    /// reload brings it back (it used to pass the current count, which load took for a fixed one).
    @Test func reloadRestoresAutoscalingThatScaleTurnedOff() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let (model, _) = try await load(host, yaml: "workers: {min: 1, max: 3}\n")
            #expect(model.autoscaler?.enabled == true)
            try await model.scale(to: 2)
            #expect(model.autoscaler?.enabled == false)
            let reloaded = try await host.reload(model.name)
            #expect(reloaded.autoscaler?.enabled == true, "\(String(describing: reloaded.autoscaler))")
            #expect(reloaded.autoscaler?.max == 3)
            #expect(reloaded.workers.count == 1, "back to workers.min")
        }
    }

    /// A reload that cannot load the model again leaves it listed, FAILED with the reason, refusing
    /// its requests with it; the next reload brings it back.
    @Test func failedReloadKeepsTheModelListedAsFailed() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let (model, dir) = try await load(host, yaml: "")
            try "".write(to: dir.appendingPathComponent("BROKEN"), atomically: true, encoding: .utf8)
            await #expect(throws: SidecarError.self) { try await host.reload(model.name) }
            #expect(host.modelNames == [model.name], "the model is still listed")
            let standIn = try #require(host.model(named: model.name))
            guard case .failed(let reason) = standIn.state else {
                Issue.record("expected FAILED, got \(standIn.state)")
                return
            }
            #expect(reason.message.contains("BROKEN flag present"), "\(reason.message)")
            #expect(!standIn.isReady)
            let refused = await #expect(throws: SidecarError.self) { try await standIn.predict(Fixtures.json("1")) }
            #expect(refused?.code == .unavailable)
            #expect(refused?.message.contains("BROKEN flag present") == true)

            try FileManager.default.removeItem(at: dir.appendingPathComponent("BROKEN"))
            let back = try await host.reload(model.name)
            #expect(back.state == .ready)
            #expect(try await back.predict(Fixtures.json("2")).json == "2")
        }
    }

    @Test func recyclingReplacesTheWorkerWithoutADipOrALostRequest() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let yaml = "recycle: {max_requests: 30, max_requests_jitter: 10}\ntimeouts: {ping_interval_s: 0.1}\n"
            let (model, _) = try await load(host, yaml: yaml)
            let firstPid = model.workers[0].pid
            // Readiness stays true through any replacement by design; what recycling promises is
            // capacity: the slot shows a serving worker (ready or busy) throughout, because the
            // successor is ready before the old worker stops taking batches.
            let fewestServing = LockedBox(Int.max)
            let samples = LockedBox(0)
            let watcher = Task {
                while !Task.isCancelled {
                    let serving = model.workers.filter { $0.state.isServing }.count
                    fewestServing.withLock { $0 = min($0, serving) }
                    samples.withLock { $0 += 1 }
                    try? await Task.sleep(for: .milliseconds(2))
                }
            }
            // Waves of requests until the worker has been replaced twice (a loaded machine starts
            // successors slowly), each wave checked answer by answer.
            var sent = 0
            let deadline = ContinuousClock.now.advanced(by: .seconds(60))
            while model.workers[0].recycles < 2, ContinuousClock.now < deadline {
                let base = sent
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for n in base..<(base + 5) {
                        group.addTask {
                            let answer = try await model.predict(Fixtures.json("\(n)"))
                            #expect(answer.json == "\(n)")
                        }
                    }
                    try await group.waitForAll()
                }
                sent += 5
                try await Task.sleep(for: .milliseconds(20))
            }
            watcher.cancel()
            let worker = model.workers[0]
            #expect(worker.recycles >= 2, "items at 30-40 per worker: \(worker)")
            #expect(worker.restarts == 0)
            #expect(worker.pid != firstPid)
            #expect(worker.itemsServed == sent)
            #expect(samples.withLock { $0 } > 50, "the watcher sampled the workers throughout")
            #expect(fewestServing.withLock { $0 } >= 1, "the count of serving workers never dropped below the target (1) while a successor started")
        }
    }

    @Test func retryFalseFailsTheItemsOfADeadWorkerInsteadOfRunningThemAgain() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let (model, _) = try await load(host, yaml: "retry: false\n")
            let results = try await model.predict(batch: strings(["a", "crash"]))
            for result in results {
                guard case .failure(let error) = result else { Issue.record("expected a failure"); continue }
                #expect(error.message.contains("retry: false"))
            }
            #expect(await eventually { model.isReady })
            #expect(try await model.predict(Fixtures.json("\"a\"")).json == "\"a\"")
        }
    }

    @Test func deadlineAnswersTheCallerWhileTheWorkerIsStillBusy() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let (model, _) = try await load(host, yaml: "")
            let start = ContinuousClock.now
            let error = await #expect(throws: SidecarError.self) {
                try await model.predict(Fixtures.json("\"sleep\""), deadline: .now.advanced(by: .milliseconds(100)))
            }
            #expect(error?.code == .deadlineExceeded)
            #expect(ContinuousClock.now - start < .milliseconds(400), "answered at the deadline, not when the batch ended")
            #expect(try await model.predict(Fixtures.json("1")).json == "1")
        }
    }

    @Test func workerOverItsMemoryLimitIsRecycled() async throws {
        let handler = """
            hoard = []

            def predict(batch):
                hoard.append(bytearray(8 << 20))  # leaks 8 MiB per batch
                return batch
            """
        let dir = try Fixtures.model([
            "handler.py": handler, "sidecar.yaml": "recycle: {max_rss_mb: 120}\ntimeouts: {ping_interval_s: 0.1}\n",
        ])
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let model = try await host.load(dir.path)
            for n in 0..<30 {
                #expect(try await model.predict(Fixtures.json("\(n)")).json == "\(n)")
                try await Task.sleep(for: .milliseconds(30))
            }
            #expect(await eventually { model.workers[0].recycles >= 1 }, "\(model.workers[0])")
            #expect(model.workers[0].restarts == 0)
        }
    }

    @Test func scalingUpAndDownUnderLoadLosesNothing() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let handler = "import time\n\ndef predict(batch):\n    time.sleep(0.02)\n    return batch\n"
            let dir = try Fixtures.model(["handler.py": handler, "sidecar.yaml": "batching: {max_batch_size: 4}\n"])
            let model = try await host.load(dir.path)
            let stop = LockedBox(false)
            let load = Task {
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for client in 0..<8 {
                        group.addTask {
                            var answered = 0
                            while !stop.withLock({ $0 }) {
                                let n = client * 1_000_000 + answered
                                let answer = try await model.predict(Fixtures.json("\(n)"))
                                #expect(answer.json == "\(n)")
                                answered += 1
                            }
                            return answered
                        }
                    }
                    return try await group.reduce(0, +)
                }
            }
            try await model.scale(to: 3, timeout: .seconds(60))
            #expect(model.workers.count == 3 && model.workers.allSatisfy { $0.state.isServing })
            try await Task.sleep(for: .milliseconds(300))
            try await model.scale(to: 1, timeout: .seconds(60))
            #expect(model.workers.count == 1)
            try await Task.sleep(for: .milliseconds(200))
            stop.withLock { $0 = true }
            let answered = try await load.value  // any failed request would have thrown
            #expect(answered > 50)
            #expect(model.workers[0].restarts == 0)
            await #expect(throws: SidecarError.self) { try await model.scale(to: 0, timeout: .seconds(1)) }
        }
    }

    @Test func autoscalerAddsWorkersUnderABurstAndRemovesThemAfter() async throws {
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let handler = "import time\n\ndef predict(batch):\n    time.sleep(0.05)\n    return batch\n"
            let yaml = "workers: {min: 1, max: 3, target_queue_ms: 20, scale_down_after_s: 2}\nbatching: {max_batch_size: 2}\n"
            let model = try await host.load(try Fixtures.model(["handler.py": handler, "sidecar.yaml": yaml]).path)
            #expect(model.workers.count == 1)
            let stop = LockedBox(false)
            let burst = Task {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for client in 0..<24 {
                        group.addTask {
                            var n = 0
                            while !stop.withLock({ $0 }) {
                                let answer = try await model.predict(Fixtures.json("\(client * 100_000 + n)"))
                                #expect(answer.json == "\(client * 100_000 + n)")
                                n += 1
                            }
                        }
                    }
                    try await group.waitForAll()
                }
            }
            #expect(await eventually(timeout: .seconds(60)) { model.workers.filter { $0.state.isServing }.count >= 2 }, "\(model.workers)")
            let decision = model.autoscaler?.lastDecision ?? ""
            #expect(decision.hasPrefix("up to"), "\(decision)")
            stop.withLock { $0 = true }
            try await burst.value  // every request of the burst was answered
            #expect(await eventually(timeout: .seconds(60)) { model.workers.count == 1 }, "\(model.workers)")
            #expect(model.autoscaler?.lastDecision?.hasPrefix("down to") == true)
            // An operator's count turns autoscaling off.
            try await model.scale(to: 2)
            #expect(model.autoscaler?.enabled == false)
        }
    }

    static func isZombie(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return false }
        return stat.split(separator: ")").last?.trimmingCharacters(in: .whitespaces).hasPrefix("Z") == true
    }
}
