import DequeModule
import Foundation
import Metrics
import Synchronization

/// How many batches a batcher formed and how many items they carried: their ratio is the batch size
/// smart batching actually achieved.
public struct BatchStatistics: Sendable, Equatable {
    public var batches = 0
    public var items = 0

    public var meanBatchSize: Double { batches == 0 ? 0 : Double(items) / Double(batches) }
}

/// A slice of one request's items waiting in the queue or travelling in a batch.
struct Chunk: Sendable {
    let request: PendingRequest
    var range: Range<Int>
    /// How many times these items were dispatched to a worker that died before answering.
    var attempts: Int = 0
}

/// A batch handed to one worker: up to `max_batch_size` items, drawn from one or more requests.
struct BatchJob: Sendable {
    let id: UInt64
    let chunks: [Chunk]
    let count: Int
    /// Run with nothing else in flight on its worker: the items were on a worker that died, so
    /// if it dies again the blame must fall on exactly this batch (see ``InFlightWindow``).
    var runsAlone = false

    /// Whether the batch carries JSON values (else tensor items): batches never mix the two.
    var isJSON: Bool { chunks.first?.request.items.first?.isJSON ?? true }

    /// The payloads in batch order.
    var payloads: [Payload] {
        var payloads: [Payload] = []
        payloads.reserveCapacity(count)
        for chunk in chunks { payloads += chunk.request.items[chunk.range] }
        return payloads
    }

    /// The JSON items in batch order (a JSON batch).
    var jsonItems: [Data] {
        var items: [Data] = []
        items.reserveCapacity(count)
        for chunk in chunks {
            for index in chunk.range {
                if case .json(let value) = chunk.request.items[index] { items.append(value.data) }
            }
        }
        return items
    }

    /// Hands each request its part of `results` (one per item, in batch order).
    func deliver(_ results: [PayloadResult]) {
        if chunks.count == 1, let only = chunks.first, only.range.count == only.request.items.count {
            only.request.complete(with: results)
            return
        }
        var offset = 0
        for chunk in chunks {
            let n = chunk.range.count
            chunk.request.fill(chunk.range, with: results[offset..<(offset + n)])
            offset += n
        }
    }

    func fail(_ error: PredictionError) {
        for chunk in chunks { chunk.request.fail(chunk.range, with: error) }
    }
}

/// One model's queue and its smart batching.
///
/// Callers ``submit(_:)`` items; workers call ``nextBatch()`` whenever they have room for another
/// batch and get everything queued, up to `max_batch_size`. At low load a request therefore travels
/// alone and at once; at high load batches grow by themselves. With `max_delay_ms` a free worker
/// waits for the batch to fill, but never longer than that past the oldest item's arrival (the timer
/// starts when the item arrived, not when a worker looked: TorchServe #2478).
///
/// The queue is bounded (`max_queue` items): past it ``submit(_:)`` fails at once with
/// ``SidecarError/Code/queueFull`` instead of letting memory grow.
///
/// Requests may carry a deadline: ``watchDeadlines()`` answers them `deadlineExceeded` when it passes,
/// and their items still queued are never dispatched.
///
/// Items of a worker that died are the batcher's to place again (``workerDied(_:reason:)``): a
/// batch is split in halves that run on their own, so one item that crashes the process ends up
/// alone and fails by itself, and everything else gets its prediction.
final class Batcher: Sendable {
    let maxBatchSize: Int
    let maxQueue: Int
    let maxDelay: Duration
    let maxRetries: Int
    /// False when items must not run twice (`retry: false`).
    let retry: Bool
    /// The deadline of requests that bring none.
    let defaultTimeout: Duration?
    let modelName: String

    private struct State {
        var items: BatchQueue
        var admission: Admission
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var waiterOrder: Deque<UInt64> = []
        var nextWaiterID: UInt64 = 0
        var closed = false
        var closedReason: SidecarError?

        mutating func popWaiter() -> CheckedContinuation<Void, Never>? {
            while let id = waiterOrder.popFirst() {
                if let waiter = waiters.removeValue(forKey: id) { return waiter }
            }
            return nil
        }
    }

    private let state: Mutex<State>
    private let deadlines = DeadlineWatch()
    /// Items per batch sent to a worker (`sidecar_batch_size`).
    private let batchSizes: Recorder
    /// Time from an item's arrival to its dispatch (`sidecar_queue_seconds`).
    private let queueWait: Metrics.Timer
    /// The last seconds of requests (rate, p99 from submit to answer) and of queue waits (per
    /// dispatched chunk): what status pages and the autoscaler read.
    let recentRequests = LatencyWindow()
    let recentQueueWaits = LatencyWindow()

    /// `sidecar_admission_refused_total` by reason, made once (not per refusal: a refusal must cost little).
    private let refusals: [RefusalReason: Counter]

    init(modelName: String, batching: ModelConfiguration.Batching, maxRetries: Int, retry: Bool = true, defaultTimeout: Duration? = nil) {
        self.modelName = modelName
        self.retry = retry
        self.defaultTimeout = defaultTimeout
        self.batchSizes = Recorder(label: "sidecar_batch_size", dimensions: [("model", modelName)], aggregate: true)
        self.queueWait = Metrics.Timer(label: "sidecar_queue_seconds", dimensions: [("model", modelName)])
        self.maxBatchSize = batching.maxBatchSize
        self.maxQueue = batching.maxQueue
        self.maxDelay = batching.maxDelay
        self.maxRetries = maxRetries
        self.state = Mutex(State(
            items: BatchQueue(maxBatchSize: batching.maxBatchSize),
            admission: Admission(maxQueue: batching.maxQueue, maxBatchSize: batching.maxBatchSize, target: batching.targetQueueDelay)))
        var refusals: [RefusalReason: Counter] = [:]
        for reason in RefusalReason.allCases {
            refusals[reason] = Counter(label: "sidecar_admission_refused_total", dimensions: [("model", modelName), ("reason", reason.rawValue)])
        }
        self.refusals = refusals
    }

    /// How admission decides now (limit, drain rate, refusals by reason).
    var admission: AdmissionStatus { state.withLock { $0.admission.status() } }

    /// The fronts' look before they read a request's body: an error when nothing could be queued
    /// now (closed, full, at the adaptive limit), so an overload is refused before any decoding;
    /// nil when the request may be taken (``submit(_:deadline:)`` decides with its items).
    func earlyRefusal() -> SidecarError? {
        let refusal: (RefusalReason, Int)?? = state.withLock { state in
            if state.closed { return .some(nil) }
            let queued = state.items.queuedItems
            guard let reason = state.admission.earlyRefusal(queued: queued) else { return nil }
            state.admission.count(reason)
            return (reason, queued)
        }
        switch refusal {
        case .none: return nil
        case .some(.none): return state.withLock { $0.closedReason } ?? SidecarError(.unavailable, "model '\(modelName)' is not serving")
        case .some(.some(let (reason, queued))):
            refusals[reason]?.increment()
            return refusalError(reason, queued: queued, count: nil, deadline: nil)
        }
    }

    private func refusalError(_ reason: RefusalReason, queued: Int, count: Int?, deadline: ContinuousClock.Instant?) -> SidecarError {
        switch reason {
        case .queueFull:
            if let count, count > maxQueue {
                return SidecarError(.queueFull, "model '\(modelName)': a request of \(count) items exceeds the queue limit of \(maxQueue) (batching.max_queue); send fewer items per request")
            }
            return SidecarError(.queueFull, "model '\(modelName)' queue is full (\(queued) of \(maxQueue) items, batching.max_queue); retry later")
        case .queueDelay:
            let status = admission
            let rate = status.drainRate.map { " (the workers take about \(Int($0)) items/s)" } ?? ""
            return SidecarError(
                .queueFull,
                "model '\(modelName)' is at its queueing-delay target of \(Self.milliseconds(status.targetQueueDelayMilliseconds ?? 0)) ms "
                    + "(batching.target_queue_delay_ms): \(queued) items queued, limit \(status.limit)\(rate); retry later")
        case .deadline:
            let rate = admission.drainRate ?? 0
            let ahead = rate > 0 ? Double(queued) / rate * 1000 : 0
            let left = deadline.map { max(0, ($0 - .now).inMilliseconds) } ?? 0
            return SidecarError(
                .queueFull,
                "model '\(modelName)' cannot reach this request before its deadline (about \(Int(ahead.rounded())) ms of queue ahead of it, "
                    + "\(Int(left.rounded())) ms left); retry later, elsewhere, or allow more time")
        }
    }

    private static func milliseconds(_ value: Double) -> Int { max(0, Int(value.rounded())) }

    /// Items waiting for a worker.
    var queuedItems: Int { state.withLock { $0.items.queuedItems } }

    /// Batches formed so far and the items they carried.
    var statistics: BatchStatistics { state.withLock { $0.items.statistics } }

    // MARK: Callers

    /// Queues `items` and waits for one result per item, in order. Cancelling the calling task
    /// withdraws the items still queued and throws `CancellationError`; past `deadline` (else the
    /// model's `request_timeout_s`) it throws ``SidecarError/Code/deadlineExceeded``.
    func submit(_ items: [Payload], deadline: ContinuousClock.Instant? = nil) async throws -> [PayloadResult] {
        if items.isEmpty { return [] }
        let request = PendingRequest(items: items, deadline: deadline ?? defaultTimeout.map { ContinuousClock.now.advanced(by: $0) })
        defer { recentRequests.record(.now - request.enqueuedAt) }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[PayloadResult], any Error>) in
                enqueue(request, continuation)
            }
        } onCancel: {
            cancel(request)
        }
    }

    private func enqueue(_ request: PendingRequest, _ continuation: CheckedContinuation<[PayloadResult], any Error>) {
        let count = request.items.count
        let outcome: Result<CheckedContinuation<Void, Never>?, any Error> = state.withLock { state in
            if state.closed {
                return .failure(state.closedReason ?? SidecarError(.unavailable, "model '\(modelName)' is not serving"))
            }
            let now = ContinuousClock.now
            let queued = state.items.queuedItems
            if let reason = state.admission.decide(queued: queued, count: count, deadline: request.deadline, now: now) {
                return .failure(Refusal(reason: reason, queued: queued))
            }
            if let deadline = request.deadline, deadline <= now { return .failure(deadlineError(for: request)) }
            guard request.attach(continuation) else { return .failure(CancellationError()) }
            state.items.append(Chunk(request: request, range: 0..<count))
            return .success(state.popWaiter())
        }
        switch outcome {
        case .success(let waiter):
            deadlines.insert(request)
            waiter?.resume()
        case .failure(let refusal as Refusal):
            refusals[refusal.reason]?.increment()
            continuation.resume(throwing: refusalError(refusal.reason, queued: refusal.queued, count: count, deadline: request.deadline))
        case .failure(let error): continuation.resume(throwing: error)
        }
    }

    /// A refusal decided under the lock; its message is written outside it.
    private struct Refusal: Error {
        let reason: RefusalReason
        let queued: Int
    }

    private func deadlineError(for request: PendingRequest) -> SidecarError {
        let waited = ContinuousClock.now - request.enqueuedAt
        let budget = request.deadline.map { $0 - request.enqueuedAt } ?? .zero
        return SidecarError(
            .deadlineExceeded,
            "model '\(modelName)': the request's deadline passed (\(Self.milliseconds(budget)) ms allowed, \(Self.milliseconds(waited)) ms waited); "
                + "allow more time (gRPC deadline, OIP 'timeout' parameter, Sidecar-Timeout-Ms header, or timeouts.request_timeout_s)")
    }

    private static func milliseconds(_ duration: Duration) -> Int { max(0, Int(duration.inMilliseconds.rounded())) }

    private func cancel(_ request: PendingRequest) {
        guard request.abort(with: CancellationError()) else { return }
        state.withLock { $0.items.dropFinished() }
    }

    // MARK: Workers

    /// The next batch for a worker with room, waiting while the queue is empty. Returns nil once the
    /// batcher is closed and drained, or when the calling task is cancelled.
    func nextBatch() async -> BatchJob? {
        while !Task.isCancelled {
            enum Step { case batch(BatchJob, wake: CheckedContinuation<Void, Never>?), finished, linger(ContinuousClock.Instant), wait }
            var expired: [PendingRequest] = []
            let step: Step = state.withLock { state in
                let now = ContinuousClock.now
                if let job = state.items.takePinned(now: now, expired: &expired) {
                    return .batch(job, wake: state.items.queuedItems > 0 ? state.popWaiter() : nil)
                }
                guard let oldest = state.items.oldest else {
                    state.admission.ranEmpty(now: now)
                    return state.closed ? .finished : .wait
                }
                if maxDelay > .zero, !state.closed, state.items.queuedItems < maxBatchSize {
                    let deadline = oldest.request.enqueuedAt.advanced(by: maxDelay)
                    if deadline > now { return .linger(deadline) }
                }
                guard let job = state.items.take(now: now, expired: &expired) else {
                    return state.closed && state.items.isEmpty ? .finished : .wait
                }
                // The item that waited least is the last one taken (the queue is in arrival order).
                let leastWait = job.chunks.last.map { now - $0.request.enqueuedAt } ?? .zero
                state.admission.dispatched(items: job.count, leastWait: leastWait, emptied: state.items.queuedItems == 0, now: now)
                // More left than this batch took: let another free worker have it.
                return .batch(job, wake: state.items.queuedItems > 0 ? state.popWaiter() : nil)
            }
            for request in expired { request.abort(with: deadlineError(for: request)) }
            switch step {
            case .batch(let job, let wake):
                wake?.resume()
                batchSizes.record(job.count)
                let now = ContinuousClock.now
                for chunk in job.chunks {
                    let waited = now - chunk.request.enqueuedAt
                    queueWait.recordNanoseconds(waited.inNanoseconds)
                    recentQueueWaits.record(waited, at: now)
                }
                return job
            case .finished:
                return nil
            case .linger(let deadline):
                try? await Task.sleep(until: deadline, clock: .continuous)
            case .wait:
                await waitForItems()
            }
        }
        return nil
    }

    private func waitForItems() async {
        let id: UInt64 = state.withLock { state in
            state.nextWaiterID += 1
            return state.nextWaiterID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { state -> Bool in
                    // Pinned batches count too: a bisect or a death that pins halves between
                    // nextBatch's look and this one finds no waiter to wake, and this worker would
                    // sleep beside them forever.
                    if !state.items.isEmpty || state.closed || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    state.waiterOrder.append(id)
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }

    /// Poison isolation: a batch whose handler raised is split in two, and each half runs next as a
    /// batch of its own; halves that raise are split again, so in the end only the items that raise
    /// by themselves get the error, and the others their predictions.
    func bisect(_ job: BatchJob) {
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            state.items.pinHalves(of: job.chunks, count: job.count, alone: false)
            return state.popWaiter()
        }
        waiter?.resume()
    }

    /// Puts a batch that never reached its worker back at the head of the queue (a batch that
    /// must run alone stays pinned as it was).
    func giveBack(_ job: BatchJob) {
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            if job.runsAlone {
                let live = job.chunks.filter { !$0.request.isFinished }
                guard !live.isEmpty else { return nil }
                state.items.pin(live, alone: true)
                return state.popWaiter()
            }
            state.items.prepend(job.chunks.filter { !$0.request.isFinished })
            return state.items.isEmpty ? nil : state.popWaiter()
        }
        waiter?.resume()
    }

    /// Places again the batches a worker died with, unanswered, in the order they were sent.
    ///
    /// A worker runs its batches one after the other, but it writes their answers asynchronously:
    /// when it dies with several unanswered, the first may have finished and its answer died with
    /// the process while a later one was running. Only a lone unanswered batch is known to be the
    /// one it was running (``workerDied(_:reason:)``). Several go back uncharged, each pinned to run
    /// alone on its worker, so that a second death is blamed on exactly the batch that caused it.
    /// With `retry: false` any of them may have run, so they all fail.
    func workerDied(unanswered jobs: [BatchJob], reason: String) {
        placeBack { policy, queue in policy.placeBack(unanswered: jobs, reason: reason, in: &queue) }
    }

    /// Places again the batch a worker was running when it died (crashed, hung, ran past
    /// `batch_timeout_s`) before answering it: see ``RetryPolicy/placeBack(running:reason:in:)``.
    func workerDied(_ job: BatchJob, reason: String) {
        placeBack { policy, queue in policy.placeBack(running: job, reason: reason, in: &queue) }
    }

    private func placeBack(_ decide: (RetryPolicy, inout BatchQueue) -> RetryPolicy.Outcome) {
        var failures: [(Chunk, PredictionError)] = []
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            let policy = RetryPolicy(retry: retry, maxRetries: maxRetries, serving: state.closedReason == nil)
            let outcome = decide(policy, &state.items)
            failures = outcome.failures
            return outcome.requeued ? state.popWaiter() : nil
        }
        waiter?.resume()
        for (chunk, error) in failures { chunk.request.fail(chunk.range, with: error) }
    }

    // MARK: Deadlines

    /// Answers requests whose deadline passed with `deadlineExceeded` and drops their queued items,
    /// until the calling task is cancelled. The executor runs it for the model's whole life.
    func watchDeadlines() async {
        await deadlines.run { due in
            for request in due { request.abort(with: deadlineError(for: request)) }
            state.withLock { $0.items.dropFinished() }
        }
    }

    /// Stops accepting items. Workers still drain what is queued; once it is empty ``nextBatch()``
    /// returns nil.
    func close() {
        let waiters: [CheckedContinuation<Void, Never>] = state.withLock { state in
            state.closed = true
            defer { state.waiters.removeAll(); state.waiterOrder.removeAll() }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Stops accepting items and fails everything queued with `error`: no worker will run them.
    func fail(_ error: SidecarError) {
        let chunks: [Chunk] = state.withLock { state in
            state.closed = true
            state.closedReason = error
            return state.items.removeAll()
        }
        close()
        for chunk in chunks { chunk.request.abort(with: error) }
    }
}
