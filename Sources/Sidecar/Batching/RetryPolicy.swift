/// What happens to the items of a worker that died before answering: the death and retry policy,
/// as a mutation of the ``BatchQueue`` (unit-tested in `BatchQueueTests`; ``Batcher`` applies it
/// under its lock and answers the failures).
struct RetryPolicy {
    /// False when items must not run twice (`retry: false`).
    var retry: Bool
    /// Lone-item reruns before it fails as the likely culprit (`max_retries`).
    var maxRetries: Int
    /// False once the model is being failed: nothing will run the items again.
    var serving: Bool

    struct Outcome {
        /// Items that fail now, each with why.
        var failures: [(Chunk, PredictionError)] = []
        /// Something was pinned to run again (a worker should be woken).
        var requeued = false
    }

    private func noRerun(_ context: String) -> String {
        retry
            ? "\(context), and the model is no longer serving"
            : "\(context); the item is not run again because the model sets retry: false (its handler must not run an item twice)"
    }

    private static func died(_ message: String) -> PredictionError {
        PredictionError(kind: .workerDied, type: "WorkerDied", message: message)
    }

    /// The batch a worker was running when it died. A batch of several items is split in halves that
    /// run next, each alone on its worker (no retry is charged: one item that kills the process ends
    /// up alone after log2(n) deaths); a lone item runs again, alone, up to `max_retries` times, then
    /// fails as the likely culprit; without retry (or serving) the items fail at once.
    func placeBack(running job: BatchJob, reason: String, in queue: inout BatchQueue) -> Outcome {
        let reason = "\(reason) while running the item"
        let live = job.chunks.filter { !$0.request.isFinished }
        let count = live.reduce(0) { $0 + $1.range.count }
        guard count > 0 else { return Outcome() }
        guard retry, serving else {
            return Outcome(failures: live.map { ($0, Self.died(noRerun(reason))) })
        }
        if count > 1 {
            queue.pinHalves(of: live, count: count, alone: true)
            return Outcome(requeued: true)
        }
        var chunk = live[0]
        chunk.attempts += 1
        guard chunk.attempts <= maxRetries else {
            return Outcome(failures: [(chunk, Self.died(
                "\(reason); this item was running alone each time its worker died (\(chunk.attempts) times, max_retries: \(maxRetries)), so it is likely what kills the worker"))])
        }
        queue.pin([chunk], alone: true)
        return Outcome(requeued: true)
    }

    /// Several batches a worker died with, unanswered. It runs batches in order but writes answers
    /// asynchronously, so the first may have finished and its answer died with the process while a
    /// later one ran: none is charged; each goes back pinned to run alone, so that a second death is
    /// blamed exactly. Without retry any of them may have run, so they all fail.
    func placeBack(unanswered jobs: [BatchJob], reason: String, in queue: inout BatchQueue) -> Outcome {
        if jobs.count == 1, let job = jobs.first { return placeBack(running: job, reason: reason, in: &queue) }
        let live = jobs.map { $0.chunks.filter { !$0.request.isFinished } }.filter { !$0.isEmpty }
        guard retry, serving else {
            let why = noRerun("\(reason) while \(jobs.count) batches were unanswered (any of them may have been running)")
            return Outcome(failures: live.flatMap { $0.map { ($0, Self.died(why)) } })
        }
        for chunks in live.reversed() { queue.pin(chunks, alone: true) }
        return Outcome(requeued: !live.isEmpty)
    }
}
