import Foundation
import Testing
@testable import Sidecar

/// The pool's and the host's lifecycle edges: waiting that must end when the waiter gives up, and
/// work that must not outlive the host.
@Suite struct PoolLifecycleTests {
    /// A pool no one runs never becomes ready: a caller waiting for it (a load being cancelled)
    /// must get CancellationError, not hang. Before the cancellation handler it waited forever.
    @Test func waitingForReadinessEndsWhenTheWaiterIsCancelled() async throws {
        let batcher = Batcher(modelName: "m", batching: .init(), maxRetries: 0)
        let spec = WorkerSpec(
            model: "m", python: URL(fileURLWithPath: "/nonexistent/python"), modelDirectory: URL(fileURLWithPath: "/nonexistent"),
            handler: "handler:predict", handlerConfig: JSONValue(trusted: Data("{}".utf8)),
            socketDirectory: URL(fileURLWithPath: "/tmp"), timeouts: .init(), maxMessageBytes: 1 << 20, window: 2)
        let pool = WorkerPool(spec: spec, size: 1, batcher: batcher, logger: Fixtures.logger)
        for delay in [Duration.zero, .milliseconds(50)] {  // cancelled before and after it registered
            let waiter = Task { try await pool.waitUntilReady() }
            try await Task.sleep(for: delay)
            waiter.cancel()
            let outcome = await Self.within(.seconds(10)) { await waiter.result }
            guard case .failure(let error)? = outcome else {
                Issue.record("the wait did not end within 10 s of its cancellation (delay \(delay))")
                return
            }
            #expect(error is CancellationError, "\(error)")
        }
    }

    /// Work the host runs in the background (a scale with "wait": false) ends before the host does.
    @Test func backgroundWorkEndsWithTheHost() async throws {
        let done = LockedBox<String?>(nil)
        let dir = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch\n"])
        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let model = try await host.load(dir.path)
            host.runInBackground {
                do {
                    try await model.scale(to: 4, timeout: .seconds(120))
                    done.withLock { $0 = "scaled" }
                } catch {
                    done.withLock { $0 = "\(error)" }
                }
            }
        }
        #expect(done.withLock { $0 } != nil, "the background scale was still running after the host returned")
    }

    /// Runs `body`, or gives up after `limit` (nil).
    static func within<T: Sendable>(_ limit: Duration, _ body: @escaping @Sendable () async -> T) async -> T? {
        await withTaskGroup(of: T?.self) { group in
            group.addTask { await body() }
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }
}
