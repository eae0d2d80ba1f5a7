import DequeModule

/// The batcher's queue as a value: the chunks waiting, the pinned batches dispatched before them
/// (halves of a batch that raised, batches back from a worker that died), and their counts.
///
/// Every operation is a plain mutation — no lock, no clock read (`now` is passed in), no waking —
/// so the batching rules (one kind per batch, `max_batch_size`, expired and cancelled requests
/// never dispatched, pinned batches first and never merged, halving) are unit-tested directly
/// (`BatchQueueTests`). ``Batcher`` holds one under its mutex and does the waking and the metrics.
struct BatchQueue {
    struct Pinned {
        var chunks: [Chunk]
        /// Dispatched as a ``BatchJob/runsAlone`` batch.
        var alone: Bool
        var count: Int { chunks.reduce(0) { $0 + $1.range.count } }
    }

    let maxBatchSize: Int
    private(set) var queue: Deque<Chunk> = []
    private(set) var pinned: Deque<Pinned> = []
    /// Items waiting, queued and pinned: what `max_queue` bounds.
    private(set) var queuedItems = 0
    private(set) var statistics = BatchStatistics()
    private var nextBatchID: UInt64 = 1

    init(maxBatchSize: Int) { self.maxBatchSize = maxBatchSize }

    var isEmpty: Bool { queue.isEmpty && pinned.isEmpty }
    /// The oldest queued chunk (not pinned): its arrival starts the linger.
    var oldest: Chunk? { queue.first }

    mutating func append(_ chunk: Chunk) {
        queue.append(chunk)
        queuedItems += chunk.range.count
    }

    /// Puts chunks back at the head of the queue, in their order (a batch that never reached its
    /// worker).
    mutating func prepend(_ chunks: [Chunk]) {
        for chunk in chunks.reversed() {
            queue.prepend(chunk)
            queuedItems += chunk.range.count
        }
    }

    /// Pins `chunks` to run next as one batch of their own, before anything queued.
    mutating func pin(_ chunks: [Chunk], alone: Bool) {
        let entry = Pinned(chunks: chunks, alone: alone)
        pinned.prepend(entry)
        queuedItems += entry.count
    }

    /// Pins the two halves of `chunks` (holding `count` items) to run next, each as its own batch.
    mutating func pinHalves(of chunks: [Chunk], count: Int, alone: Bool) {
        let (left, right) = Self.halves(of: chunks, count: count)
        pin(right, alone: alone)
        pin(left, alone: alone)
    }

    /// Drops chunks of requests already answered (cancelled, expired), so that they stop counting
    /// against `max_queue`.
    mutating func dropFinished() {
        queue.removeAll { $0.request.isFinished }
        pinned = Deque(pinned.map { Pinned(chunks: $0.chunks.filter { !$0.request.isFinished }, alone: $0.alone) }.filter { !$0.chunks.isEmpty })
        queuedItems = queue.reduce(0) { $0 + $1.range.count } + pinned.reduce(0) { $0 + $1.count }
    }

    /// Empties the queue, returning every chunk it held.
    mutating func removeAll() -> [Chunk] {
        defer {
            queue.removeAll()
            pinned.removeAll()
            queuedItems = 0
        }
        return Array(queue) + pinned.flatMap(\.chunks)
    }

    /// The next pinned batch, skipping requests already answered; requests whose deadline passed
    /// are dropped and added to `expired` for the caller to answer.
    mutating func takePinned(now: ContinuousClock.Instant, expired: inout [PendingRequest]) -> BatchJob? {
        while let next = pinned.popFirst() {
            queuedItems -= next.count
            let live = next.chunks.filter { chunk in
                if chunk.request.isFinished { return false }
                if let deadline = chunk.request.deadline, deadline <= now {
                    expired.append(chunk.request)
                    return false
                }
                return true
            }
            guard !live.isEmpty else { continue }
            return job(live, count: live.reduce(0) { $0 + $1.range.count }, alone: next.alone)
        }
        return nil
    }

    /// Up to `max_batch_size` queued items of one kind (JSON or tensors), oldest first; a chunk
    /// larger than the room left is split. Nil when nothing live is queued.
    mutating func take(now: ContinuousClock.Instant, expired: inout [PendingRequest]) -> BatchJob? {
        var chunks: [Chunk] = []
        var count = 0
        var kindIsJSON: Bool?
        while count < maxBatchSize, var chunk = queue.popFirst() {
            if chunk.request.isFinished {  // cancelled or answered while queued: drop it
                queuedItems -= chunk.range.count
                continue
            }
            if let deadline = chunk.request.deadline, deadline <= now {
                // Its caller has stopped waiting: never dispatch it (the watch may not have run yet).
                queuedItems -= chunk.range.count
                expired.append(chunk.request)
                continue
            }
            // One kind per batch: the handler gets JSON values or tensor dicts, never a mix.
            let isJSON = chunk.request.items[chunk.range.lowerBound].isJSON
            if let kindIsJSON, kindIsJSON != isJSON {
                queue.prepend(chunk)
                break
            }
            kindIsJSON = isJSON
            let room = maxBatchSize - count
            if chunk.range.count > room {
                let split = chunk.range.lowerBound + room
                queue.prepend(Chunk(request: chunk.request, range: split..<chunk.range.upperBound, attempts: chunk.attempts))
                chunk.range = chunk.range.lowerBound..<split
            }
            count += chunk.range.count
            queuedItems -= chunk.range.count
            chunks.append(chunk)
        }
        return count > 0 ? job(chunks, count: count, alone: false) : nil
    }

    private mutating func job(_ chunks: [Chunk], count: Int, alone: Bool) -> BatchJob {
        let id = nextBatchID
        nextBatchID += 1
        statistics.batches += 1
        statistics.items += count
        return BatchJob(id: id, chunks: chunks, count: count, runsAlone: alone)
    }

    /// `chunks` (holding `count` items) split into two runs of about half the items each.
    static func halves(of chunks: [Chunk], count: Int) -> ([Chunk], [Chunk]) {
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
}
