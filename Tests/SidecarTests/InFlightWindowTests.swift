import Testing
@testable import Sidecar

/// The per-worker window on its own: a batch that runs alone goes out only into an empty window
/// and keeps it to itself.
@Suite struct InFlightWindowTests {
    func job(_ id: UInt64, alone: Bool = false) -> BatchJob { BatchJob(id: id, chunks: [], count: 1, runsAlone: alone) }

    /// True when `wait` returns within `timeout`.
    func returns(within timeout: Duration = .milliseconds(200), _ wait: @escaping @Sendable () async -> Void) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask { await wait(); return true }
            group.addTask { try? await Task.sleep(for: timeout); return false }
            let first = await group.next()!
            group.cancelAll()  // cancelling the wait makes it return
            return first
        }
    }

    @Test func aLoneBatchWaitsForAnEmptyWindow() async {
        let window = InFlightWindow(capacity: 2)
        #expect(window.add(job(1)))
        #expect(await returns { await window.waitForRoom() })  // one of two taken: room for another
        #expect(!(await returns { await window.waitForRoom(alone: true) }))
        let waiting = Task { await window.waitForRoom(alone: true) }
        _ = window.remove(1)
        await waiting.value
        #expect(window.count == 0)
    }

    @Test func aLoneBatchKeepsTheWindowToItself() async {
        let window = InFlightWindow(capacity: 2)
        #expect(window.add(job(1, alone: true)))
        #expect(!(await returns { await window.waitForRoom() }))
        let waiting = Task { await window.waitForRoom() }
        _ = window.remove(1)
        await waiting.value
        #expect(window.add(job(2)))
        #expect(await returns { await window.waitForRoom() })
    }
}
