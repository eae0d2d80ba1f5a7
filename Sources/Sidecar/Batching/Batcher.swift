import DequeModule
import Foundation
import HeapModule
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

    /// A request's deadline in the watch's heap. Weak: a request answered long before its deadline
    /// is not kept alive by the heap.
    private struct DeadlineEntry: Comparable {
        let deadline: ContinuousClock.Instant
        weak var request: PendingRequest?

        static func < (a: Self, b: Self) -> Bool { a.deadline < b.deadline }
        static func == (a: Self, b: Self) -> Bool { a.deadline == b.deadline }
    }

    private struct Pinned {
        var chunks: [Chunk]
        /// Dispatched as a ``BatchJob/runsAlone`` batch.
        var alone: Bool
        var count: Int { chunks.reduce(0) { $0 + $1.range.count } }
    }

    private struct State {
        var queue: Deque<Chunk> = []
        /// Halves of batches that raised or whose worker died, and batches of a worker that died:
        /// dispatched first, each as its own batch, never merged.
        var pinned: Deque<Pinned> = []
        var queuedItems = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var waiterOrder: Deque<UInt64> = []
        var nextWaiterID: UInt64 = 0
        var nextBatchID: UInt64 = 1
        var closed = false
        var closedReason: SidecarError?
        var statistics = BatchStatistics()
        var deadlines = Heap<DeadlineEntry>()
        var deadlineWatcher: CheckedContinuation<Void, Never>?

        /// Drops chunks of requests that are already answered (cancelled, expired) so that they
        /// stop counting against `max_queue`.
        mutating func dropFinished() {
            queue.removeAll { $0.request.isFinished }
            pinned = Deque(pinned.map { Pinned(chunks: $0.chunks.filter { !$0.request.isFinished }, alone: $0.alone) }.filter { !$0.chunks.isEmpty })
            queuedItems = queue.reduce(0) { $0 + $1.range.count } + pinned.reduce(0) { $0 + $1.count }
        }

        mutating func popWaiter() -> CheckedContinuation<Void, Never>? {
            while let id = waiterOrder.popFirst() {
                if let waiter = waiters.removeValue(forKey: id) { return waiter }
            }
            return nil
        }
    }

    private let state = Mutex(State())
    /// Items per batch sent to a worker (`sidecar_batch_size`).
    private let batchSizes: Recorder
    /// Time from an item's arrival to its dispatch (`sidecar_queue_seconds`).
    private let queueWait: Metrics.Timer
    /// The last seconds of requests (rate, p99 from submit to answer) and of queue waits (per
    /// dispatched chunk): what status pages and the autoscaler read.
    let recentRequests = LatencyWindow()
    let recentQueueWaits = LatencyWindow()

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
    }

    /// Items waiting for a worker.
    var queuedItems: Int { state.withLock { $0.queuedItems } }

    /// Batches formed so far and the items they carried.
    var statistics: BatchStatistics { state.withLock { $0.statistics } }

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
            if state.queuedItems + count > maxQueue {
                let message = count > maxQueue
                    ? "model '\(modelName)': a request of \(count) items exceeds the queue limit of \(maxQueue) (batching.max_queue); send fewer items per request"
                    : "model '\(modelName)' queue is full (\(state.queuedItems) of \(maxQueue) items, batching.max_queue); retry later"
                return .failure(SidecarError(.queueFull, message))
            }
            if let deadline = request.deadline, deadline <= .now { return .failure(deadlineError(for: request)) }
            guard request.attach(continuation) else { return .failure(CancellationError()) }
            state.queue.append(Chunk(request: request, range: 0..<count))
            state.queuedItems += count
            if let deadline = request.deadline {
                state.deadlines.insert(DeadlineEntry(deadline: deadline, request: request))
                if let watcher = state.deadlineWatcher {
                    state.deadlineWatcher = nil
                    watcher.resume()
                }
            }
            return .success(state.popWaiter())
        }
        switch outcome {
        case .success(let waiter): waiter?.resume()
        case .failure(let error): continuation.resume(throwing: error)
        }
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
        state.withLock { $0.dropFinished() }
    }

    // MARK: Workers

    /// The next batch for a worker with room, waiting while the queue is empty. Returns nil once the
    /// batcher is closed and drained, or when the calling task is cancelled.
    func nextBatch() async -> BatchJob? {
        while !Task.isCancelled {
            enum Step { case batch(BatchJob, wake: CheckedContinuation<Void, Never>?), finished, linger(ContinuousClock.Instant), wait }
            var expired: [PendingRequest] = []
            let step: Step = state.withLock { state in
                if let job = takePinned(&state, expired: &expired) {
                    return .batch(job, wake: state.queuedItems > 0 ? state.popWaiter() : nil)
                }
                guard let oldest = state.queue.first else { return state.closed ? .finished : .wait }
                if maxDelay > .zero, !state.closed, state.queuedItems < maxBatchSize {
                    let deadline = oldest.request.enqueuedAt.advanced(by: maxDelay)
                    if deadline > .now { return .linger(deadline) }
                }
                let job = take(&state, expired: &expired)
                if job.count == 0 { return state.closed && state.queue.isEmpty ? .finished : .wait }
                // More left than this batch took: let another free worker have it.
                return .batch(job, wake: state.queuedItems > 0 ? state.popWaiter() : nil)
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

    private func takePinned(_ state: inout State, expired: inout [PendingRequest]) -> BatchJob? {
        let now = ContinuousClock.now
        while let pinned = state.pinned.popFirst() {
            state.queuedItems -= pinned.count
            let live = pinned.chunks.filter { chunk in
                if chunk.request.isFinished { return false }
                if let deadline = chunk.request.deadline, deadline <= now {
                    expired.append(chunk.request)
                    return false
                }
                return true
            }
            guard !live.isEmpty else { continue }
            let id = state.nextBatchID
            state.nextBatchID += 1
            state.statistics.batches += 1
            let count = live.reduce(0) { $0 + $1.range.count }
            state.statistics.items += count
            return BatchJob(id: id, chunks: live, count: count, runsAlone: pinned.alone)
        }
        return nil
    }

    private func take(_ state: inout State, expired: inout [PendingRequest]) -> BatchJob {
        var chunks: [Chunk] = []
        var count = 0
        var kindIsJSON: Bool?
        let now = ContinuousClock.now
        while count < maxBatchSize, var chunk = state.queue.popFirst() {
            if chunk.request.isFinished {  // cancelled or answered while queued: drop it
                state.queuedItems -= chunk.range.count
                continue
            }
            if let deadline = chunk.request.deadline, deadline <= now {
                // Its caller has stopped waiting: never dispatch it (the watch may not have run yet).
                state.queuedItems -= chunk.range.count
                expired.append(chunk.request)
                continue
            }
            // One kind per batch: the handler gets JSON values or tensor dicts, never a mix.
            let isJSON = chunk.request.items[chunk.range.lowerBound].isJSON
            if let kindIsJSON, kindIsJSON != isJSON {
                state.queue.prepend(chunk)
                break
            }
            kindIsJSON = isJSON
            let room = maxBatchSize - count
            if chunk.range.count > room {
                let split = chunk.range.lowerBound + room
                state.queue.prepend(Chunk(request: chunk.request, range: split..<chunk.range.upperBound, attempts: chunk.attempts))
                chunk.range = chunk.range.lowerBound..<split
            }
            count += chunk.range.count
            state.queuedItems -= chunk.range.count
            chunks.append(chunk)
        }
        guard count > 0 else { return BatchJob(id: 0, chunks: [], count: 0) }
        let id = state.nextBatchID
        state.nextBatchID += 1
        state.statistics.batches += 1
        state.statistics.items += count
        return BatchJob(id: id, chunks: chunks, count: count)
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
                    if !state.queue.isEmpty || !state.pinned.isEmpty || state.closed || Task.isCancelled { return true }
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
        let (left, right) = Self.halves(of: job.chunks, count: job.count)
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            state.pinned.prepend(Pinned(chunks: right, alone: false))
            state.pinned.prepend(Pinned(chunks: left, alone: false))
            state.queuedItems += job.count
            return state.popWaiter()
        }
        waiter?.resume()
    }

    /// `chunks` (holding `count` items) split into two runs of about half the items each.
    private static func halves(of chunks: [Chunk], count: Int) -> ([Chunk], [Chunk]) {
        var left: [Chunk] = []
        var right: [Chunk] = []
        var remaining = count / 2
        for chunk in chunks {
            if remaining >= chunk.range.count {
                left.append(chunk)
                remaining -= chunk.range.count
            } else if remaining > 0 {
                let split = chunk.range.lowerBound + remaining
                left.append(Chunk(request: chunk.request, range: chunk.range.lowerBound..<split, attempts: chunk.attempts))
                right.append(Chunk(request: chunk.request, range: split..<chunk.range.upperBound, attempts: chunk.attempts))
                remaining = 0
            } else {
                right.append(chunk)
            }
        }
        return (left, right)
    }

    /// Puts a batch that never reached its worker back at the head of the queue (a batch that
    /// must run alone stays pinned as it was).
    func giveBack(_ job: BatchJob) {
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            if job.runsAlone {
                let live = job.chunks.filter { !$0.request.isFinished }
                guard !live.isEmpty else { return nil }
                let pinned = Pinned(chunks: live, alone: true)
                state.pinned.prepend(pinned)
                state.queuedItems += pinned.count
                return state.popWaiter()
            }
            for chunk in job.chunks.reversed() where !chunk.request.isFinished {
                state.queue.prepend(chunk)
                state.queuedItems += chunk.range.count
            }
            return state.queue.isEmpty ? nil : state.popWaiter()
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
        guard jobs.count > 1 else {
            if let job = jobs.first { workerDied(job, reason: reason) }
            return
        }
        var failures: [(Chunk, PredictionError)] = []
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            let live = jobs.map { $0.chunks.filter { !$0.request.isFinished } }.filter { !$0.isEmpty }
            if !retry || state.closedReason != nil {
                let context = "\(reason) while \(jobs.count) batches were unanswered (any of them may have been running)"
                let why = retry
                    ? "\(context), and the model is no longer serving"
                    : "\(context); the item is not run again because the model sets retry: false (its handler must not run an item twice)"
                failures = live.flatMap { $0.map { ($0, PredictionError(kind: .workerDied, type: "WorkerDied", message: why)) } }
                return nil
            }
            for chunks in live.reversed() {
                let pinned = Pinned(chunks: chunks, alone: true)
                state.pinned.prepend(pinned)
                state.queuedItems += pinned.count
            }
            return live.isEmpty ? nil : state.popWaiter()
        }
        waiter?.resume()
        for (chunk, error) in failures { chunk.request.fail(chunk.range, with: error) }
    }

    /// Places again the batch a worker was running when it died (crashed, hung, ran past
    /// `batch_timeout_s`) before answering it. Nothing is lost, and one bad item cannot take others
    /// down with it:
    ///
    /// - a batch of several items is split in halves that run next, each as its own batch and alone
    ///   on whichever worker is free. Splitting costs no retry: if one item kills the process, it
    ///   ends up alone after log2(n) crashes while the others are answered;
    /// - a lone item runs again (alone on its worker) up to `max_retries` times, then fails as the
    ///   likely culprit;
    /// - with `retry: false`, or when the model is being failed, the items fail at once.
    func workerDied(_ job: BatchJob, reason: String) {
        let reason = "\(reason) while running the item"
        var failures: [(Chunk, PredictionError)] = []
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            let live = job.chunks.filter { !$0.request.isFinished }
            let count = live.reduce(0) { $0 + $1.range.count }
            guard count > 0 else { return nil }
            if !retry || state.closedReason != nil {
                let why = retry
                    ? "\(reason), and the model is no longer serving"
                    : "\(reason); the item is not run again because the model sets retry: false (its handler must not run an item twice)"
                failures = live.map { ($0, PredictionError(kind: .workerDied, type: "WorkerDied", message: why)) }
                return nil
            }
            if count > 1 {
                let (left, right) = Self.halves(of: live, count: count)
                state.pinned.prepend(Pinned(chunks: right, alone: true))
                state.pinned.prepend(Pinned(chunks: left, alone: true))
                state.queuedItems += count
                return state.popWaiter()
            }
            var chunk = live[0]
            chunk.attempts += 1
            if chunk.attempts > maxRetries {
                failures = [(chunk, PredictionError(
                    kind: .workerDied, type: "WorkerDied",
                    message: "\(reason); this item was running alone each time its worker died (\(chunk.attempts) times, max_retries: \(maxRetries)), so it is likely what kills the worker"))]
                return nil
            }
            state.pinned.prepend(Pinned(chunks: [chunk], alone: true))
            state.queuedItems += 1
            return state.popWaiter()
        }
        waiter?.resume()
        for (chunk, error) in failures { chunk.request.fail(chunk.range, with: error) }
    }

    // MARK: Deadlines

    /// Answers requests whose deadline passed with `deadlineExceeded` and drops their queued items,
    /// until the calling task is cancelled. The executor runs it for the model's whole life.
    func watchDeadlines() async {
        while !Task.isCancelled {
            let next: ContinuousClock.Instant? = state.withLock { $0.deadlines.min?.deadline }
            if let next {
                // Wake at the earliest deadline, and at least every 10 ms: a later insert may be earlier.
                let wake = min(next, ContinuousClock.now.advanced(by: .milliseconds(10)))
                try? await Task.sleep(until: wake, clock: .continuous)
            } else {
                await withTaskCancellationHandler {
                    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                        let resumeNow = state.withLock { state -> Bool in
                            if !state.deadlines.isEmpty || Task.isCancelled { return true }
                            state.deadlineWatcher = continuation
                            return false
                        }
                        if resumeNow { continuation.resume() }
                    }
                } onCancel: {
                    state.withLock { state in
                        defer { state.deadlineWatcher = nil }
                        return state.deadlineWatcher
                    }?.resume()
                }
            }
            expireDeadlines()
        }
    }

    private func expireDeadlines() {
        let now = ContinuousClock.now
        let due: [PendingRequest] = state.withLock { state in
            var due: [PendingRequest] = []
            while let first = state.deadlines.min, first.deadline <= now {
                let entry = state.deadlines.removeMin()
                if let request = entry.request, !request.isFinished { due.append(request) }
            }
            return due
        }
        guard !due.isEmpty else { return }
        for request in due { request.abort(with: deadlineError(for: request)) }
        state.withLock { $0.dropFinished() }
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
            defer { state.queue.removeAll(); state.pinned.removeAll(); state.queuedItems = 0 }
            return Array(state.queue) + state.pinned.flatMap { $0.chunks }
        }
        close()
        for chunk in chunks { chunk.request.abort(with: error) }
    }
}
