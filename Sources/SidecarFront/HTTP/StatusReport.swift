import Foundation
import Sidecar

/// An optional that encodes as an explicit `null` rather than a missing key, so that scripts reading
/// the status and admin JSON can rely on every key being present.
@propertyWrapper
struct ExplicitNull<Value: Encodable>: Encodable {
    var wrappedValue: Value?

    init(wrappedValue: Value?) { self.wrappedValue = wrappedValue }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let wrappedValue { try container.encode(wrappedValue) } else { try container.encodeNil() }
    }
}

extension ExplicitNull: Sendable where Value: Sendable {}

/// `GET /status` and `GET /status/{model}`: what the supervisor knows about each model and each of
/// its workers, for operators and scripts (the same facts as the metrics, per worker).
struct StatusReport: Encodable {
    struct ModelStatus: Encodable {
        var name: String
        /// The version ("1" for a model loaded from a directory).
        var version: String
        /// Its share of the name's traffic (a repository version; nil for a directory model, which
        /// has all of it; 0 for a version loaded but not, or no longer, serving).
        @ExplicitNull var weight: Int?
        /// loading, ready or failed.
        var state: String
        /// Why the model is FAILED (the last exit reason and the Python error), else nil.
        @ExplicitNull var reason: String?
        /// The Python traceback or stderr behind `reason`.
        @ExplicitNull var detail: String?
        var queued: Int
        /// process or embedded.
        var executor: String
        /// Why an embedded model runs with process workers, or who shares its interpreter.
        @ExplicitNull var executorNote: String?
        var workers: [Worker]
        /// How requests are admitted: `max_queue` alone, or the adaptive queue-delay target.
        var admission: Admission
        /// The circuit breaker (`breaker:`), null without one.
        @ExplicitNull var breaker: Breaker?
        /// What answers when the model cannot (`fallback:`), null without one.
        @ExplicitNull var fallback: Fallback?

        enum CodingKeys: String, CodingKey {
            case name, version, weight, state, reason, detail, queued, executor, executorNote = "executor_note", workers, admission
            case breaker, fallback
        }
    }

    struct Breaker: Encodable {
        /// closed, open or half_open.
        var state: String
        var requests: Int
        var failures: Int
        var opened: Int
        @ExplicitNull var retryInS: Double?
        /// When it last opened, ISO 8601.
        @ExplicitNull var openedAt: String?

        enum CodingKeys: String, CodingKey {
            case state, requests, failures, opened, retryInS = "retry_in_s", openedAt = "opened_at"
        }

        init(_ status: BreakerStatus) {
            state = status.state
            requests = status.requests
            failures = status.failures
            opened = status.opened
            retryInS = status.retryIn.map { ($0.inSeconds * 10).rounded() / 10 }
            openedAt = status.openedAt.map { ISO8601DateFormatter().string(from: $0) }
        }
    }

    struct Fallback: Encodable {
        /// The fallback model's name, or `response` for a fixed answer.
        var source: String
        var on: [String]
        @ExplicitNull var afterMs: Double?

        enum CodingKeys: String, CodingKey {
            case source, on, afterMs = "after_ms"
        }

        init(_ fallback: ModelConfiguration.Fallback) {
            if case .model(let name) = fallback.target { source = name } else { source = "response" }
            on = fallback.on.map(\.rawValue).sorted()
            afterMs = fallback.after.map(\.inMilliseconds)
        }
    }

    struct Admission: Encodable {
        var mode: String
        var limit: Int
        @ExplicitNull var targetQueueDelayMs: Double?
        @ExplicitNull var drainRate: Double?
        @ExplicitNull var minQueueDelayMs: Double?
        /// The last interval's items all waited past the target (the adaptive limit is shrinking).
        var standingQueue: Bool
        /// Requests refused at arrival, by reason (queue_full, queue_delay, deadline).
        var refused: [String: Int]

        enum CodingKeys: String, CodingKey {
            case mode, limit, targetQueueDelayMs = "target_queue_delay_ms", drainRate = "drain_rate_items_per_s"
            case minQueueDelayMs = "min_queue_delay_ms", standingQueue = "standing_queue", refused
        }

        init(_ status: AdmissionStatus) {
            mode = status.mode
            limit = status.limit
            targetQueueDelayMs = status.targetQueueDelayMilliseconds
            drainRate = status.drainRate.map { ($0 * 10).rounded() / 10 }
            minQueueDelayMs = status.minQueueDelayMilliseconds.map { ($0 * 100).rounded() / 100 }
            standingQueue = status.standingQueue
            refused = Dictionary(uniqueKeysWithValues: RefusalReason.allCases.map { ($0.rawValue, status.refused[$0] ?? 0) })
        }
    }

    struct Worker: Encodable {
        var index: Int
        var state: String
        @ExplicitNull var pid: Int32?
        var restarts: Int
        var recycles: Int
        @ExplicitNull var lastError: String?
        @ExplicitNull var rssBytes: Int?
        var inFlight: Int
        var batchesServed: Int
        var itemsServed: Int
        @ExplicitNull var pythonVersion: String?

        enum CodingKeys: String, CodingKey {
            case index, state, pid, restarts, recycles, lastError = "last_error", rssBytes = "rss_bytes", inFlight = "in_flight"
            case batchesServed = "batches_served", itemsServed = "items_served", pythonVersion = "python_version"
        }
    }

    var models: [ModelStatus]
    /// With a repository (`serve --repository`): what this node synced, and why anything is missing.
    @ExplicitNull var repository: RepositoryStatus?
    /// The inboxes this node reads (`inboxes:` or a model's `inbox:`).
    var inboxes: [InboxStatus] = []

    static func model(_ model: Model, host: ModelHost? = nil) -> ModelStatus {
        let (state, reason, detail): (String, String?, String?) = switch model.state {
        case .loading: ("loading", nil, nil)
        case .ready: ("ready", nil, nil)
        case .failed(let error): ("failed", error.message, error.detail)
        }
        let weight = model.version.flatMap { version in
            host?.versions(of: model.name).map { $0.split.shares.first { $0.version == version }?.weight ?? 0 }
        }
        return ModelStatus(
            name: model.name, version: model.servedVersion, weight: weight, state: state, reason: reason, detail: detail, queued: model.queuedItems,
            executor: model.executorKind.rawValue, executorNote: model.executorNote,
            workers: model.workers.map { w in
                Worker(
                    index: w.index, state: w.state.rawValue, pid: w.pid, restarts: w.restarts, recycles: w.recycles,
                    lastError: w.lastError, rssBytes: w.rssBytes, inFlight: w.inFlight, batchesServed: w.batchesServed,
                    itemsServed: w.itemsServed, pythonVersion: w.pythonVersion)
            },
            admission: Admission(model.admission), breaker: model.breaker.map(Breaker.init), fallback: model.configuration.fallback.map(Fallback.init))
    }

    static func host(_ host: ModelHost, repository: RepositorySync? = nil, inboxes: InboxService? = nil) -> StatusReport {
        StatusReport(models: host.loadedModels.map { model($0, host: host) }, repository: repository?.status, inboxes: inboxes?.statuses ?? [])
    }
}
