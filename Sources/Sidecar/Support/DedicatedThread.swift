import DequeModule
import Foundation
import Synchronization

/// A dedicated OS thread fed jobs through a queue: for work that must not run on Swift's
/// cooperative pool, which is as wide as the core count.
///
/// Python runs on these (a handler that blocks, or waits for the GIL, on a pool thread would stall
/// every task of the server), and so do the broker's blocking client calls (hiredis). A job runs to
/// its end on this thread; async callers wait for it through a continuation without holding a pool
/// thread.
package final class DedicatedThread: @unchecked Sendable {
    // Guarded by `condition`.
    private let condition = NSCondition()
    private var jobs: Deque<() -> Void> = []
    private var finishing = false
    /// Jobs queued, readable without the lock: what the thread watches while it spins.
    private let queued = Atomic<Int>(0)
    /// After a job, the thread looks for the next one this long before it sleeps.
    private let spin: Duration

    /// For Python: a batch that follows within 30 µs starts without a wake-up (tens of µs on a VM),
    /// at the price of this much CPU per batch when none follows.
    static let pythonSpin: Duration = .microseconds(30)

    /// 16 MiB: what CPython's main thread gets on Linux; deep recursion in a handler (or numpy,
    /// scikit-learn) must not overflow a smaller thread stack.
    package init(name: String, stackSize: Int = 16 << 20, spin: Duration = .zero) {
        self.spin = spin
        let thread = Thread { [self] in self.loop() }
        thread.name = name
        thread.stackSize = stackSize
        thread.start()
    }

    private func loop() {
        while true {
            if spin > .zero {
                let until = ContinuousClock.now.advanced(by: spin)
                while queued.load(ordering: .acquiring) == 0, ContinuousClock.now < until {}
            }
            condition.lock()
            while jobs.isEmpty, !finishing { condition.wait() }
            guard let job = jobs.popFirst() else {
                condition.unlock()
                return
            }
            queued.subtract(1, ordering: .relaxed)
            condition.unlock()
            job()
        }
    }

    /// Queues `job`; false once the thread is finishing (the job will not run).
    @discardableResult
    package func submit(_ job: @escaping () -> Void) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !finishing else { return false }
        jobs.append(job)
        queued.add(1, ordering: .releasing)
        condition.signal()
        return true
    }

    /// Runs `body` on the thread and returns its value; `ifFinished` when the thread takes no jobs.
    package func run<T: Sendable>(ifFinished: T, _ body: @escaping () -> T) async -> T {
        await withCheckedContinuation { (continuation: CheckedContinuation<T, Never>) in
            let queued = submit { continuation.resume(returning: body()) }
            if !queued { continuation.resume(returning: ifFinished) }
        }
    }

    /// The thread ends once the jobs already queued have run.
    package func finish() {
        condition.lock()
        finishing = true
        condition.signal()
        condition.unlock()
    }
}
