import Foundation
import Testing
@testable import Sidecar

/// The batcher on its own: no processes, a test plays the worker.
@Suite struct BatcherTests {
    func batcher(maxBatch: Int = 4, maxQueue: Int = 100, delay: Duration = .zero, retries: Int = 2, retry: Bool = true) -> Batcher {
        var batching = ModelConfiguration.Batching()
        batching.maxBatchSize = maxBatch
        batching.maxQueue = maxQueue
        batching.maxDelay = delay
        return Batcher(modelName: "t", batching: batching, maxRetries: retries, retry: retry)
    }

    /// A JSON batch's items as text, in batch order.
    func texts(_ job: BatchJob) -> [String] { job.jsonItems.map { String(decoding: $0, as: UTF8.self) } }

    func items(_ values: ClosedRange<Int>) -> [Payload] { values.map { .json(Fixtures.json("\($0)")) } }

    /// Echoes a batch back as results.
    func answer(_ job: BatchJob) {
        job.deliver(job.payloads.map { .success($0) })
    }

    func texts(_ results: [PayloadResult]) throws -> [String] {
        try results.map { result in
            guard case .json(let value) = try result.get() else { return "tensors" }
            return value.json
        }
    }

    @Test func freeWorkerTakesEverythingQueuedUpToMax() async throws {
        let b = batcher(maxBatch: 4)
        async let first = b.submit(items(1...3))
        async let second = b.submit(items(4...6))
        #expect(await eventually { b.queuedItems == 6 })
        let job1 = try #require(await b.nextBatch())
        #expect(job1.count == 4)  // 3 from the first request, 1 from the second
        let job2 = try #require(await b.nextBatch())
        #expect(job2.count == 2)
        answer(job2)
        answer(job1)
        #expect(try texts(await first) == ["1", "2", "3"])
        #expect(try texts(await second) == ["4", "5", "6"])
    }

    @Test func waitingWorkerWakesWhenItemsArrive() async throws {
        let b = batcher()
        let worker = Task { await b.nextBatch() }
        try await Task.sleep(for: .milliseconds(50))
        async let result = b.submit(items(7...7))
        let job = try #require(await worker.value)
        answer(job)
        #expect(try texts(await result) == ["7"])
    }

    @Test func lingerWaitsForTheBatchToFillButNotPastTheDelay() async throws {
        let b = batcher(maxBatch: 10, delay: .milliseconds(200))
        let start = ContinuousClock.now
        async let result = b.submit(items(1...2))
        let job = try #require(await b.nextBatch())
        #expect(ContinuousClock.now - start >= .milliseconds(150))
        #expect(job.count == 2)
        answer(job)
        _ = try await result
    }

    @Test func fullQueueIsRefusedAtOnce() async throws {
        let b = batcher(maxQueue: 5)
        let waiting = Task { try await b.submit(items(1...4)) }
        #expect(await eventually { b.queuedItems == 4 })
        let error = await #expect(throws: SidecarError.self) { try await b.submit(items(5...6)) }
        #expect(error?.code == .queueFull)
        #expect(error?.message.contains("max_queue") == true)
        waiting.cancel()
        _ = await waiting.result
    }

    @Test func cancellingACallerWithdrawsItsQueuedItems() async throws {
        let b = batcher()
        let caller = Task { try await b.submit(items(1...3)) }
        #expect(await eventually { b.queuedItems == 3 })
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
        #expect(b.queuedItems == 0)
    }

    /// A batch whose worker died is split; only an item that keeps killing workers on its own fails.
    @Test func deadWorkersBatchIsSplitUntilTheCulpritIsAlone() async throws {
        let b = batcher(maxBatch: 10, retries: 1)
        async let results = b.submit(items(1...4))
        #expect(await eventually { b.queuedItems == 4 })
        let job = try #require(await b.nextBatch())
        async let late = b.submit(items(5...5))
        #expect(await eventually { b.queuedItems == 1 })
        b.workerDied(job, reason: "worker 0 was killed by signal 9")
        let left = try #require(await b.nextBatch())
        let right = try #require(await b.nextBatch())
        #expect(texts(left) == ["1", "2"])
        #expect(texts(right) == ["3", "4"])
        answer(right)
        b.workerDied(left, reason: "worker 0 was killed by signal 9")
        let one = try #require(await b.nextBatch())
        let two = try #require(await b.nextBatch())
        #expect(one.count == 1 && two.count == 1)
        answer(two)
        b.workerDied(one, reason: "worker 0 was killed by signal 9")  // alone: first retry
        let again = try #require(await b.nextBatch())
        #expect(again.count == 1)
        b.workerDied(again, reason: "worker 1 was killed by signal 9")  // alone again: past max_retries
        let final = try await results
        guard case .failure(let error) = final[0] else { Issue.record("item 1 should fail"); return }
        #expect(error.kind == .workerDied)
        #expect(error.message.contains("max_retries: 1"))
        #expect(try texts(Array(final[1...])) == ["2", "3", "4"])
        // The other caller's item, queued behind the splits, runs after them.
        let rest = try #require(await b.nextBatch())
        answer(rest)
        #expect(try texts(await late) == ["5"])
    }

    /// A worker that dies with two batches unanswered may have finished the first (its answer died
    /// with it) while running the second: neither is charged, and each runs again alone.
    @Test func batchesOfAWorkerThatDiedWithSeveralUnansweredRunAgainAloneUncharged() async throws {
        let b = batcher(maxBatch: 10, retries: 0)
        async let first = b.submit(items(1...2))
        #expect(await eventually { b.queuedItems == 2 })
        let job1 = try #require(await b.nextBatch())
        async let second = b.submit(items(3...3))
        #expect(await eventually { b.queuedItems == 1 })
        let job2 = try #require(await b.nextBatch())
        #expect(!job1.runsAlone && !job2.runsAlone)
        b.workerDied(unanswered: [job1, job2], reason: "worker 0 exited with status 17")
        let again1 = try #require(await b.nextBatch())
        let again2 = try #require(await b.nextBatch())
        #expect(again1.runsAlone && again2.runsAlone)
        #expect(texts(again1) == ["1", "2"])  // not split: not blamed
        #expect(texts(again2) == ["3"])
        #expect((again1.chunks + again2.chunks).allSatisfy { $0.attempts == 0 })
        answer(again1)
        // Alone, a death is blamed exactly: with max_retries 0 the lone item fails at once.
        b.workerDied(unanswered: [again2], reason: "worker 1 exited with status 17")
        #expect(try texts(await first) == ["1", "2"])
        guard case .failure(let error) = try await second[0] else { Issue.record("item 3 should fail"); return }
        #expect(error.message.contains("worker 1 exited with status 17 while running the item"))
        #expect(b.queuedItems == 0)
    }

    /// A lone batch handed back before it reached its worker keeps running alone.
    @Test func aLoneBatchGivenBackStaysAlone() async throws {
        let b = batcher(maxBatch: 10)
        async let results = b.submit(items(1...1))
        let job = try #require(await b.nextBatch())
        b.workerDied(job, reason: "worker 0 was killed by signal 9")
        let alone = try #require(await b.nextBatch())
        #expect(alone.runsAlone)
        b.giveBack(alone)
        let again = try #require(await b.nextBatch())
        #expect(again.runsAlone && again.chunks[0].attempts == 1)
        answer(again)
        #expect(try texts(await results) == ["1"])
    }

    @Test func retryFalseFailsEveryUnansweredBatchOfADeadWorker() async throws {
        let b = batcher(maxBatch: 10, retry: false)
        async let first = b.submit(items(1...1))
        let job1 = try #require(await b.nextBatch())
        async let second = b.submit(items(2...2))
        let job2 = try #require(await b.nextBatch())
        b.workerDied(unanswered: [job1, job2], reason: "worker 0 exited with status 1")
        for result in try await first + second {
            guard case .failure(let error) = result else { Issue.record("expected a failure"); continue }
            #expect(error.message.contains("any of them may have been running"))
            #expect(error.message.contains("retry: false"))
        }
        #expect(b.queuedItems == 0)
    }

    @Test func retryFalseFailsTheItemsOfADeadWorkerAtOnce() async throws {
        let b = batcher(maxBatch: 10, retry: false)
        async let results = b.submit(items(1...3))
        let job = try #require(await b.nextBatch())
        b.workerDied(job, reason: "worker 0 exited with status 1")
        for result in try await results {
            guard case .failure(let error) = result else { Issue.record("expected a failure"); continue }
            #expect(error.kind == .workerDied)
            #expect(error.message.contains("retry: false"))
        }
        #expect(b.queuedItems == 0)
    }

    @Test func expiredRequestIsAnsweredAtItsDeadlineAndNeverDispatched() async throws {
        let b = batcher()
        let watch = Task { await b.watchDeadlines() }
        defer { watch.cancel() }
        let start = ContinuousClock.now
        do {
            _ = try await b.submit(items(1...3), deadline: .now.advanced(by: .milliseconds(100)))
            Issue.record("expected deadlineExceeded")
        } catch let error as SidecarError {
            #expect(error.code == .deadlineExceeded)
            // The budget counts from the request's arrival, a moment after the test computed the
            // deadline (on a busy machine a few ms later).
            let allowed = error.message.firstMatch(of: /\((\d+) ms allowed/).flatMap { Int($0.1) }
            #expect(allowed.map { (50...100).contains($0) } == true, "\(error.message)")
        }
        let waited = ContinuousClock.now - start
        #expect(waited >= .milliseconds(100) && waited < .seconds(5))
        #expect(b.queuedItems == 0)
        // A live request queued after it is what a worker gets.
        async let live = b.submit(items(4...4))
        let job = try #require(await b.nextBatch())
        #expect(texts(job) == ["4"])
        answer(job)
        #expect(try texts(await live) == ["4"])
    }

    @Test func itemsPastTheirDeadlineAreDroppedAtDispatchEvenWithoutTheWatch() async throws {
        let b = batcher()
        let expired = Task { try await b.submit(items(1...2), deadline: .now.advanced(by: .milliseconds(20))) }
        #expect(await eventually { b.queuedItems == 2 })
        try await Task.sleep(for: .milliseconds(40))
        async let live = b.submit(items(3...3))
        #expect(await eventually { b.queuedItems == 3 })
        let job = try #require(await b.nextBatch())
        #expect(job.count == 1)
        answer(job)
        #expect(try texts(await live) == ["3"])
        await #expect(throws: SidecarError.self) { try await expired.value }
    }

    @Test func defaultTimeoutAppliesToRequestsWithoutADeadline() async throws {
        let b = Batcher(modelName: "t", batching: .init(), maxRetries: 2, defaultTimeout: .milliseconds(50))
        let watch = Task { await b.watchDeadlines() }
        defer { watch.cancel() }
        await #expect(throws: SidecarError.self) { _ = try await b.submit(items(1...1)) }
    }

    @Test func batchesNeverMixJSONAndTensors() async throws {
        let b = batcher(maxBatch: 10)
        let tensor = Payload.tensors([Tensor(name: "x", datatype: .fp32, shape: [1], data: Data(count: 4))])
        async let json1 = b.submit(items(1...2))
        #expect(await eventually { b.queuedItems == 2 })
        async let tensors = b.submit([tensor, tensor])
        #expect(await eventually { b.queuedItems == 4 })
        async let json2 = b.submit(items(3...3))
        #expect(await eventually { b.queuedItems == 5 })
        let first = try #require(await b.nextBatch())
        #expect(first.isJSON && first.count == 2)
        let second = try #require(await b.nextBatch())
        #expect(!second.isJSON && second.count == 2)
        let third = try #require(await b.nextBatch())
        #expect(third.isJSON && third.count == 1)
        for job in [first, second, third] { answer(job) }
        _ = try await (json1, tensors, json2)
    }

    @Test func bisectedHalvesRunFirstAndAlone() async throws {
        let b = batcher(maxBatch: 10)
        async let first = b.submit(items(1...5))
        #expect(await eventually { b.queuedItems == 5 })
        let job = try #require(await b.nextBatch())
        async let later = b.submit(items(6...6))
        #expect(await eventually { b.queuedItems == 1 })
        b.bisect(job)
        let left = try #require(await b.nextBatch())
        let right = try #require(await b.nextBatch())
        #expect(texts(left) == ["1", "2"])
        #expect(texts(right) == ["3", "4", "5"])
        let next = try #require(await b.nextBatch())
        #expect(next.count == 1, "the queued item was not merged into a half")
        for job in [left, right, next] { answer(job) }
        #expect(try texts(await first) == ["1", "2", "3", "4", "5"])
        _ = try await later
    }

    @Test func closeDrainsThenEnds() async throws {
        let b = batcher()
        async let result = b.submit(items(1...1))
        #expect(await eventually { b.queuedItems == 1 })
        b.close()
        await #expect(throws: SidecarError.self) { try await b.submit(items(2...2)) }
        let job = try #require(await b.nextBatch())
        answer(job)
        #expect(await b.nextBatch() == nil)
        _ = try await result
    }
}
