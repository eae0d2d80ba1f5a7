import Foundation

/// A loaded model: send it items, get predictions.
///
/// ```swift
/// try await withModel(at: "Examples/iris", workers: 2) { model in
///     let label = try await model.predict(JSONValue(json: "[5.1, 3.5, 1.4, 0.2]"))
///     print(label.json)   // "setosa"
/// }
/// ```
///
/// Concurrent callers share batches: the batcher groups whatever is queued when a worker is free.
public final class Model: Sendable {
    public let name: String
    public let bundle: ModelBundle
    public let environment: PythonEnvironment
    let batcher: Batcher
    let executor: any Executor

    init(bundle: ModelBundle, environment: PythonEnvironment, batcher: Batcher, executor: any Executor) {
        self.name = bundle.configuration.name
        self.bundle = bundle
        self.environment = environment
        self.batcher = batcher
        self.executor = executor
    }

    public var configuration: ModelConfiguration { bundle.configuration }

    /// Predicts one item. Throws ``PredictionError`` when the handler failed for it, and
    /// ``SidecarError`` when the model cannot take it (queue full, stopped).
    public func predict(_ item: JSONValue) async throws -> JSONValue {
        let results = try await batcher.submit([item])
        return try results[0].get()
    }

    /// Predicts many items in one call: one result per item, in order. One item's failure does not
    /// fail the others. Throws only when the model cannot take the items at all.
    public func predict(batch items: [JSONValue]) async throws -> [ItemResult] {
        try await batcher.submit(items)
    }

    /// Items waiting for a worker.
    public var queuedItems: Int { batcher.queuedItems }

    /// Batches dispatched to workers so far and the items they carried (retries count again).
    public var batchStatistics: BatchStatistics { batcher.statistics }

    /// One status per worker slot.
    public var workers: [WorkerStatus] { executor.workers }
}
