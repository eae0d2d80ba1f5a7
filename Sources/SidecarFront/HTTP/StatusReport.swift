import Foundation
import Sidecar

/// `GET /status` and `GET /status/{model}`: what the supervisor knows about each model and each of
/// its workers, for operators and scripts (the same facts as the metrics, per worker).
struct StatusReport: Encodable {
    struct ModelStatus: Encodable {
        var name: String
        /// loading, ready or failed.
        var state: String
        /// Why the model is FAILED (the last exit reason and the Python error), else nil.
        var reason: String?
        /// The Python traceback or stderr behind `reason`.
        var detail: String?
        var queued: Int
        var workers: [Worker]

        enum CodingKeys: String, CodingKey { case name, state, reason, detail, queued, workers }

        func encode(to encoder: any Encoder) throws {
            // Explicit nulls: scripts can rely on every key being present.
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(name, forKey: .name)
            try container.encode(state, forKey: .state)
            try container.encode(reason, forKey: .reason)
            try container.encode(detail, forKey: .detail)
            try container.encode(queued, forKey: .queued)
            try container.encode(workers, forKey: .workers)
        }
    }

    struct Worker: Encodable {
        var index: Int
        var state: String
        var pid: Int32?
        var restarts: Int
        var recycles: Int
        var lastError: String?
        var rssBytes: Int?
        var inFlight: Int
        var batchesServed: Int
        var itemsServed: Int
        var pythonVersion: String?

        enum CodingKeys: String, CodingKey {
            case index, state, pid, restarts, recycles, lastError = "last_error", rssBytes = "rss_bytes", inFlight = "in_flight"
            case batchesServed = "batches_served", itemsServed = "items_served", pythonVersion = "python_version"
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(index, forKey: .index)
            try container.encode(state, forKey: .state)
            try container.encode(pid, forKey: .pid)
            try container.encode(restarts, forKey: .restarts)
            try container.encode(recycles, forKey: .recycles)
            try container.encode(lastError, forKey: .lastError)
            try container.encode(rssBytes, forKey: .rssBytes)
            try container.encode(inFlight, forKey: .inFlight)
            try container.encode(batchesServed, forKey: .batchesServed)
            try container.encode(itemsServed, forKey: .itemsServed)
            try container.encode(pythonVersion, forKey: .pythonVersion)
        }
    }

    var models: [ModelStatus]

    static func model(_ model: Model) -> ModelStatus {
        let (state, reason, detail): (String, String?, String?) = switch model.state {
        case .loading: ("loading", nil, nil)
        case .ready: ("ready", nil, nil)
        case .failed(let error): ("failed", error.message, error.detail)
        }
        return ModelStatus(
            name: model.name, state: state, reason: reason, detail: detail, queued: model.queuedItems,
            workers: model.workers.map { w in
                Worker(
                    index: w.index, state: w.state.rawValue, pid: w.pid, restarts: w.restarts, recycles: w.recycles,
                    lastError: w.lastError, rssBytes: w.rssBytes, inFlight: w.inFlight, batchesServed: w.batchesServed,
                    itemsServed: w.itemsServed, pythonVersion: w.pythonVersion)
            })
    }

    static func host(_ host: ModelHost) -> StatusReport {
        StatusReport(models: host.modelNames.compactMap { host.model(named: $0) }.map(model))
    }
}
