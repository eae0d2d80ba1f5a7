import NIOCore
import NIOPosix

/// The thread every worker session runs on: its gRPC connection (an event loop of its own) and its
/// async code (the reader of results, the dispatcher, the pinger), as one task executor.
///
/// Why a thread of its own: feeding workers is the work that makes a model's capacity, and it must
/// not wait behind the fronts. On the shared event loops and the cooperative pool, each hop of the
/// feeding path (a result read, the batch's callers answered, the next batch taken and written)
/// queued behind every connection's work; under an overload of refused requests those queues are
/// long and the workers sat idle between batches (goodput fell to a tenth of capacity at ten times
/// it, `scripts/bench-overload.sh`). Here the hops of one batch are calls on one thread, in order,
/// with nothing else queued before them but other workers' batches.
enum WorkerIO {
    /// One thread: a session's work is small (protobuf in and out, a few continuations); a second
    /// thread would only add hand-offs.
    static let group: MultiThreadedEventLoopGroup = ._makePerpetualGroup(threadNamePrefix: "sidecar-worker-io-", numberOfThreads: 1)

    /// Tasks that prefer this executor (``WorkerProcess/runSession(pid:)`` and its children) run on
    /// the event loop's thread.
    static let executor = EventLoopTaskExecutor(group.next())
}

/// A task executor backed by one NIO event loop: a job is run as one of the loop's tasks.
final class EventLoopTaskExecutor: TaskExecutor {
    let eventLoop: any EventLoop

    init(_ eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
