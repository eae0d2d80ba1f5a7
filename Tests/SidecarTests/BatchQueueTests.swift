import Foundation
import Testing
@testable import Sidecar

/// The batching rules as mutations of a value: no lock, no clock, no worker (BatcherTests and the
/// real-process suites check the batcher around it).
@Suite struct BatchQueueTests {
    let now = ContinuousClock.now

    func request(_ count: Int, tensors: Bool = false, deadline: ContinuousClock.Instant? = nil) -> PendingRequest {
        let item: Payload = tensors
            ? .tensors([Tensor(name: "x", datatype: .fp32, shape: [1], data: Data(count: 4))])
            : .json(JSONValue(trusted: Data("1".utf8)))
        return PendingRequest(items: Array(repeating: item, count: count), deadline: deadline)
    }

    func chunk(_ request: PendingRequest) -> Chunk { Chunk(request: request, range: 0..<request.items.count) }

    @Test func aBatchTakesUpToMaxBatchSizeSplittingTheChunkThatDoesNotFit() {
        var queue = BatchQueue(maxBatchSize: 4)
        let (a, b) = (request(3), request(3))
        queue.append(chunk(a))
        queue.append(chunk(b))
        #expect(queue.queuedItems == 6)
        var expired: [PendingRequest] = []
        let first = queue.take(now: now, expired: &expired)
        #expect(first?.count == 4)
        #expect(first?.chunks.map(\.range) == [0..<3, 0..<1])
        #expect(queue.queuedItems == 2)
        let second = queue.take(now: now, expired: &expired)
        #expect(second?.chunks.map(\.range) == [1..<3])
        #expect(second?.chunks.first?.request === b)
        #expect(queue.take(now: now, expired: &expired) == nil)
        #expect(queue.statistics == BatchStatistics(batches: 2, items: 6))
        #expect(first?.id != second?.id)
    }

    @Test func aBatchHoldsOneKindOfItem() {
        var queue = BatchQueue(maxBatchSize: 8)
        queue.append(chunk(request(2)))
        queue.append(chunk(request(2, tensors: true)))
        queue.append(chunk(request(2)))
        var expired: [PendingRequest] = []
        #expect(queue.take(now: now, expired: &expired).map { ($0.count, $0.isJSON) } ?? (0, false) == (2, true))
        #expect(queue.take(now: now, expired: &expired).map { ($0.count, $0.isJSON) } ?? (0, true) == (2, false))
        #expect(queue.take(now: now, expired: &expired)?.count == 2)
    }

    @Test func answeredAndExpiredRequestsAreNeverDispatched() {
        var queue = BatchQueue(maxBatchSize: 8)
        let cancelled = request(2)
        let late = request(2, deadline: now.advanced(by: .milliseconds(-1)))
        let live = request(2)
        for r in [cancelled, late, live] { queue.append(chunk(r)) }
        _ = cancelled.abort(with: CancellationError())
        var expired: [PendingRequest] = []
        let job = queue.take(now: now, expired: &expired)
        #expect(job?.chunks.map(\.request).map(ObjectIdentifier.init) == [ObjectIdentifier(live)])
        #expect(expired.map(ObjectIdentifier.init) == [ObjectIdentifier(late)], "expired requests go back to be answered")
        #expect(queue.queuedItems == 0)
    }

    @Test func pinnedBatchesGoFirstAloneAndAreNeverMerged() {
        var queue = BatchQueue(maxBatchSize: 8)
        queue.append(chunk(request(3)))
        let dead = request(2)
        queue.pin([chunk(dead)], alone: true)
        let raised = request(4)
        queue.pinHalves(of: [chunk(raised)], count: 4, alone: false)
        #expect(queue.queuedItems == 9)
        var expired: [PendingRequest] = []
        let halves = [queue.takePinned(now: now, expired: &expired), queue.takePinned(now: now, expired: &expired)]
        #expect(halves.map { $0?.chunks.map(\.range) } == [[0..<2], [2..<4]])
        #expect(halves.allSatisfy { $0?.runsAlone == false })
        let alone = queue.takePinned(now: now, expired: &expired)
        #expect(alone?.runsAlone == true && alone?.count == 2)
        #expect(queue.takePinned(now: now, expired: &expired) == nil)
        #expect(queue.take(now: now, expired: &expired)?.count == 3)
        #expect(queue.queuedItems == 0)
    }

    @Test func halvesSplitAcrossChunks() {
        let (a, b) = (request(3), request(2))
        let (left, right) = BatchQueue.halves(of: [chunk(a), chunk(b)], count: 5)
        #expect(left.map(\.range) == [0..<2])
        #expect(right.map(\.range) == [2..<3, 0..<2])
        let (one, none) = BatchQueue.halves(of: [chunk(request(1))], count: 1)
        #expect(one.isEmpty && none.count == 1, "a lone item is not split")
    }

    @Test func droppingFinishedRequestsFreesTheirRoomAndPrependKeepsOrder() {
        var queue = BatchQueue(maxBatchSize: 8)
        let (a, b, c) = (request(2), request(3), request(1))
        queue.append(chunk(a))
        queue.pin([chunk(b)], alone: true)
        _ = a.abort(with: CancellationError())
        _ = b.abort(with: CancellationError())
        queue.dropFinished()
        #expect(queue.queuedItems == 0 && queue.isEmpty)
        queue.append(chunk(c))
        let back = [Chunk(request: a, range: 0..<1), Chunk(request: b, range: 0..<1)]
        queue.prepend(back)
        #expect(queue.queue.map(\.request).map(ObjectIdentifier.init) == [a, b, c].map(ObjectIdentifier.init))
        #expect(queue.removeAll().count == 3)
        #expect(queue.queuedItems == 0)
    }

    // MARK: The retry policy for the items of a worker that died

    func job(_ chunks: [Chunk]) -> BatchJob {
        BatchJob(id: 1, chunks: chunks, count: chunks.reduce(0) { $0 + $1.range.count })
    }

    @Test func aDeadBatchOfSeveralItemsIsHalvedAloneWithoutChargingARetry() {
        var queue = BatchQueue(maxBatchSize: 8)
        let policy = RetryPolicy(retry: true, maxRetries: 2, serving: true)
        let outcome = policy.placeBack(running: job([chunk(request(4))]), reason: "worker 0 died", in: &queue)
        #expect(outcome.requeued && outcome.failures.isEmpty)
        var expired: [PendingRequest] = []
        let halves = [queue.takePinned(now: now, expired: &expired), queue.takePinned(now: now, expired: &expired)]
        #expect(halves.map { $0?.count } == [2, 2])
        #expect(halves.allSatisfy { $0?.runsAlone == true })
        #expect(halves.allSatisfy { $0?.chunks.allSatisfy { $0.attempts == 0 } == true })
    }

    @Test func aLoneItemIsRetriedUpToMaxRetriesThenBlamed() {
        var queue = BatchQueue(maxBatchSize: 8)
        let policy = RetryPolicy(retry: true, maxRetries: 2, serving: true)
        var current = job([chunk(request(1))])
        var expired: [PendingRequest] = []
        for attempt in 1...2 {
            #expect(policy.placeBack(running: current, reason: "died", in: &queue).requeued)
            guard let again = queue.takePinned(now: now, expired: &expired) else { Issue.record("not requeued"); return }
            #expect(again.runsAlone && again.chunks[0].attempts == attempt)
            current = again
        }
        let last = policy.placeBack(running: current, reason: "died", in: &queue)
        #expect(!last.requeued)
        #expect(last.failures.first?.1.message.contains("likely what kills the worker") == true)
    }

    @Test func withoutRetryOrWhenNotServingTheItemsFailAtOnce() {
        for policy in [RetryPolicy(retry: false, maxRetries: 2, serving: true), RetryPolicy(retry: true, maxRetries: 2, serving: false)] {
            var queue = BatchQueue(maxBatchSize: 8)
            let outcome = policy.placeBack(running: job([chunk(request(3))]), reason: "died", in: &queue)
            #expect(outcome.failures.count == 1 && !outcome.requeued && queue.isEmpty)
            #expect(outcome.failures[0].1.message.contains(policy.retry ? "no longer serving" : "retry: false"))
        }
    }

    @Test func severalUnansweredBatchesGoBackUnchargedEachAlone() {
        var queue = BatchQueue(maxBatchSize: 8)
        let policy = RetryPolicy(retry: true, maxRetries: 0, serving: true)
        let (a, b) = (request(1), request(3))
        let outcome = policy.placeBack(unanswered: [job([chunk(a)]), job([chunk(b)])], reason: "died", in: &queue)
        #expect(outcome.requeued && outcome.failures.isEmpty, "max_retries 0 does not matter: neither is charged")
        var expired: [PendingRequest] = []
        let first = queue.takePinned(now: now, expired: &expired)
        let second = queue.takePinned(now: now, expired: &expired)
        #expect(first?.chunks.first?.request === a && first?.runsAlone == true, "in the order they were sent")
        #expect(second?.count == 3 && second?.runsAlone == true, "not halved: it is not known to have been running")
    }
}
