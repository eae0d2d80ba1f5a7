/// `body`'s value, or nil if `budget` passed first; `body` is then cancelled (and its value, if
/// one still comes, is let go). A model's latency budget (`fallback.after_ms`) and the gRPC
/// front's wait for a request message use it.
public func within<Value: Sendable>(_ budget: Duration, _ body: @escaping @Sendable () async throws -> Value) async throws -> Value? {
    try await withThrowingTaskGroup(of: Value?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: budget)
            return nil
        }
        defer { group.cancelAll() }
        return try await group.next() ?? nil
    }
}
