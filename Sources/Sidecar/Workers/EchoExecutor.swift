import Synchronization

/// Answers every item with itself inside the Swift process: no Python, no worker protocol.
///
/// This is a measuring instrument, not a way to serve: run the front with it
/// (`sidecar serve --benchmark-echo`, ``HostOptions/benchmarkEcho``) and a load test measures the
/// front, the batcher and the request path alone — the ceiling any real executor sits under. The
/// difference between it and the process pool is what the worker hop and Python cost.
final class EchoExecutor: Executor {
    private let batcher: Batcher
    /// Concurrent batch takers, like a pool's workers: batches form the same way.
    private let lanes: Int
    private let stopped = Mutex(false)

    init(batcher: Batcher, lanes: Int) {
        self.batcher = batcher
        self.lanes = max(1, lanes)
    }

    func run() async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.batcher.watchDeadlines() }
            await withDiscardingTaskGroup { takers in
                for _ in 0..<lanes {
                    takers.addTask {
                        while let job = await self.batcher.nextBatch() {
                            job.deliver(job.payloads.map { .success($0) })
                        }
                    }
                }
            }
            group.cancelAll()
        }
    }

    func waitUntilReady() async throws {}

    func stop() {
        stopped.withLock { $0 = true }
        batcher.close()
    }

    var workers: [WorkerStatus] { [] }

    func resize(to workers: Int, timeout: Duration) async throws {
        throw SidecarError(.invalidInput, "a model served with --benchmark-echo has no workers to scale")
    }

    var autoscaler: AutoscalerStatus? { nil }

    func disableAutoscaling(reason: String) {}

    var isAvailable: Bool { !stopped.withLock { $0 } }

    var failure: SidecarError? { nil }
}
