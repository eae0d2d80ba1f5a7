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
final class Batcher: Sendable {
    let maxBatchSize: Int
    let maxQueue: Int
    let maxDelay: Duration
    let maxRetries: Int
    let modelName: String

    private struct State {
        var queue: Deque<Chunk> = []
        /// Halves of batches that raised: dispatched first, each as its own batch, never merged.
        var pinned: Deque<[Chunk]> = []
        var queuedItems = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var waiterOrder: Deque<UInt64> = []
        var nextWaiterID: UInt64 = 0
        var nextBatchID: UInt64 = 1
        var closed = false
        var closedReason: SidecarError?
        var statistics = BatchStatistics()

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

    init(modelName: String, batching: ModelConfiguration.Batching, maxRetries: Int) {
        self.modelName = modelName
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
    /// withdraws the items still queued and throws `CancellationError`.
    func submit(_ items: [Payload]) async throws -> [PayloadResult] {
        if items.isEmpty { return [] }
        let request = PendingRequest(items: items)
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
            guard request.attach(continuation) else { return .failure(CancellationError()) }
            state.queue.append(Chunk(request: request, range: 0..<count))
            state.queuedItems += count
            return .success(state.popWaiter())
        }
        switch outcome {
        case .success(let waiter): waiter?.resume()
        case .failure(let error): continuation.resume(throwing: error)
        }
    }

    private func cancel(_ request: PendingRequest) {
        guard request.abort(with: CancellationError()) else { return }
        state.withLock { state in
            let before = state.queue.count
            state.queue.removeAll { $0.request === request }
            if state.queue.count != before {
                state.queuedItems = state.queue.reduce(0) { $0 + $1.range.count }
            }
        }
    }

    // MARK: Workers

    /// The next batch for a worker with room, waiting while the queue is empty. Returns nil once the
    /// batcher is closed and drained, or when the calling task is cancelled.
    func nextBatch() async -> BatchJob? {
        while !Task.isCancelled {
            enum Step { case batch(BatchJob, wake: CheckedContinuation<Void, Never>?), finished, linger(ContinuousClock.Instant), wait }
            let step: Step = state.withLock { state in
                if let job = takePinned(&state) {
                    return .batch(job, wake: state.queuedItems > 0 ? state.popWaiter() : nil)
                }
                guard let oldest = state.queue.first else { return state.closed ? .finished : .wait }
                if maxDelay > .zero, !state.closed, state.queuedItems < maxBatchSize {
                    let deadline = oldest.request.enqueuedAt.advanced(by: maxDelay)
                    if deadline > .now { return .linger(deadline) }
                }
                let job = take(&state)
                // More left than this batch took: let another free worker have it.
                return .batch(job, wake: state.queuedItems > 0 ? state.popWaiter() : nil)
            }
            switch step {
            case .batch(let job, let wake):
                wake?.resume()
                batchSizes.record(job.count)
                let now = ContinuousClock.now
                for chunk in job.chunks {
                    let waited = (now - chunk.request.enqueuedAt).components
                    queueWait.recordNanoseconds(waited.seconds * 1_000_000_000 + waited.attoseconds / 1_000_000_000)
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

    private func takePinned(_ state: inout State) -> BatchJob? {
        while let chunks = state.pinned.popFirst() {
            state.queuedItems -= chunks.reduce(0) { $0 + $1.range.count }
            let live = chunks.filter { !$0.request.isFinished }
            guard !live.isEmpty else { continue }
            let id = state.nextBatchID
            state.nextBatchID += 1
            state.statistics.batches += 1
            let count = live.reduce(0) { $0 + $1.range.count }
            state.statistics.items += count
            return BatchJob(id: id, chunks: live, count: count)
        }
        return nil
    }

    private func take(_ state: inout State) -> BatchJob {
        var chunks: [Chunk] = []
        var count = 0
        var kindIsJSON: Bool?
        while count < maxBatchSize, var chunk = state.queue.popFirst() {
            if chunk.request.isFinished {  // cancelled while queued: drop it
                state.queuedItems -= chunk.range.count
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
                    if !state.queue.isEmpty || state.closed || Task.isCancelled { return true }
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
        var left: [Chunk] = []
        var right: [Chunk] = []
        var remaining = job.count / 2
        for chunk in job.chunks {
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
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            state.pinned.prepend(right)
            state.pinned.prepend(left)
            state.queuedItems += job.count
            return state.popWaiter()
        }
        waiter?.resume()
    }

    /// Puts the batch of a worker that died back at the head of the queue, so another worker runs it
    /// next; items already dispatched `maxRetries` times fail instead.
    func requeue(_ job: BatchJob, reason: String) {
        var exhausted: [Chunk] = []
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            for var chunk in job.chunks.reversed() where !chunk.request.isFinished {
                chunk.attempts += 1
                if chunk.attempts > maxRetries || state.closedReason != nil {
                    exhausted.append(chunk)
                } else {
                    state.queue.prepend(chunk)
                    state.queuedItems += chunk.range.count
                }
            }
            return state.queue.isEmpty ? nil : state.popWaiter()
        }
        waiter?.resume()
        for chunk in exhausted {
            chunk.request.fail(
                chunk.range,
                with: PredictionError(
                    kind: .workerDied, type: "WorkerDied",
                    message: "\(reason); the item was tried \(chunk.attempts) times (max_retries: \(maxRetries))"))
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
            defer { state.queue.removeAll(); state.pinned.removeAll(); state.queuedItems = 0 }
            return Array(state.queue) + state.pinned.flatMap { $0 }
        }
        close()
        for chunk in chunks { chunk.request.abort(with: error) }
    }
}
