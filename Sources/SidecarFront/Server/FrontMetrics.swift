import Metrics
import Prometheus
import Sidecar
import Synchronization

/// The Prometheus side of Sidecar's metrics.
///
/// The core records through swift-metrics (batch sizes, queue wait, compute time, restarts); the
/// front adds requests, errors and latency per model and protocol, and at each scrape the queue depth
/// and the worker counts by state. `bootstrap()` points swift-metrics at this registry once per
/// process.
final class FrontMetrics: Sendable {
    let registry: PrometheusCollectorRegistry

    private static let bootstrapped = Mutex<PrometheusCollectorRegistry?>(nil)

    /// The process-wide registry: swift-metrics can be bootstrapped only once.
    static func shared() -> FrontMetrics {
        let registry = bootstrapped.withLock { current -> PrometheusCollectorRegistry in
            if let current { return current }
            let registry = PrometheusCollectorRegistry()
            var factory = PrometheusMetricsFactory(registry: registry)
            factory.defaultValueHistogramBuckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
            factory.defaultDurationHistogramBuckets = [
                .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2.5),
                .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
                .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(10),
            ]
            MetricsSystem.bootstrap(factory)
            current = registry
            return registry
        }
        return FrontMetrics(registry: registry)
    }

    private init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    /// The `model` label of requests naming a model that is not loaded.
    static let unknownModel = "_unknown"

    /// The handles of one (model, protocol, error code), made once: a request, and above all a
    /// refusal under overload, must not pay for building labels and looking them up in the factory.
    private struct Handles {
        let requests: Metrics.Counter
        let errors: Metrics.Counter?
        let seconds: Metrics.Timer
    }

    private struct HandleKey: Hashable {
        let model: String
        let proto: String
        let code: String?
    }

    private let handles = Mutex<[HandleKey: Handles]>([:])

    /// Counts one request and its latency; `error` is nil when it succeeded.
    func record(model: String, protocol proto: String, since start: ContinuousClock.Instant, error: FrontError?) {
        // Requests for models (or versions) that do not exist share one label: a client sending
        // made-up names must not grow the registry, and the /metrics page, without bound.
        let key = HandleKey(model: error?.code == .notFound ? Self.unknownModel : model, proto: proto, code: error?.metricLabel)
        let found = handles.withLock { $0[key] } ?? {
            let labels = [("model", key.model), ("protocol", proto)]
            let made = Handles(
                requests: Counter(label: "sidecar_requests_total", dimensions: labels),
                errors: key.code.map { Counter(label: "sidecar_request_errors_total", dimensions: labels + [("code", $0)]) },
                seconds: Metrics.Timer(label: "sidecar_request_seconds", dimensions: labels))
            // Only loaded models get past the unknown-model label, so the table stays as small as the registry.
            handles.withLock { $0[key] = made }
            return made
        }()
        found.requests.increment()
        found.errors?.increment()
        found.seconds.recordNanoseconds((ContinuousClock.now - start).inNanoseconds)
    }

    /// The gauges read from the host at each scrape, with their `# HELP` text.
    private static let help: [String: String] = [
        "sidecar_queue_depth": "Items waiting for a worker.",
        "sidecar_admission_limit": "Queued items the model admits now: max_queue, or the adaptive limit (batching.target_queue_delay_ms).",
        "sidecar_admission_drain_rate": "Items per second the workers took from the queue while it stayed backlogged (the adaptive limit's measure).",
        "sidecar_workers": "Worker slots by state.",
        "sidecar_worker_restarts": "Worker processes replaced after ending unexpectedly, all slots.",
        "sidecar_model_failed": "1 while the model is FAILED (crash-loop breaker tripped), else 0.",
        "sidecar_worker_rss_bytes": "Resident memory of the worker process.",
        "sidecar_worker_items_served": "Items answered by the worker slot.",
        "sidecar_worker_batches_served": "Batches answered by the worker slot.",
        "sidecar_worker_slot_restarts": "Times the worker slot's process was replaced after ending unexpectedly.",
    ]

    private func gauge(_ name: String, _ labels: [(String, String)]) -> Prometheus.Gauge {
        registry.makeGauge(
            descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: Self.help[name] ?? ""), labels: labels)
    }

    /// The exposition text, with the gauges read from the host now.
    func exposition(host: ModelHost) -> String {
        for name in host.modelNames {
            guard let model = host.model(named: name) else { continue }
            gauge("sidecar_queue_depth", [("model", name)]).set(Double(model.queuedItems))
            let admission = model.admission
            gauge("sidecar_admission_limit", [("model", name)]).set(Double(admission.limit))
            gauge("sidecar_admission_drain_rate", [("model", name)]).set(admission.drainRate ?? 0)
            let workers = model.workers
            for state in WorkerStatus.State.allCases {
                gauge("sidecar_workers", [("model", name), ("state", state.rawValue)]).set(Double(workers.filter { $0.state == state }.count))
            }
            gauge("sidecar_worker_restarts", [("model", name)]).set(Double(workers.reduce(0) { $0 + $1.restarts }))
            let failed: Bool
            if case .failed = model.state { failed = true } else { failed = false }
            gauge("sidecar_model_failed", [("model", name)]).set(failed ? 1.0 : 0.0)
            // Reading the breaker moves it to half-open once its cool-down passed (its gauge with it).
            _ = model.breaker
            // Per worker: what `GET /status` shows, for dashboards and alerts.
            for worker in workers {
                let labels = [("model", name), ("worker", "\(worker.index)")]
                gauge("sidecar_worker_rss_bytes", labels).set(Double(worker.rssBytes ?? 0))
                gauge("sidecar_worker_items_served", labels).set(Double(worker.itemsServed))
                gauge("sidecar_worker_batches_served", labels).set(Double(worker.batchesServed))
                gauge("sidecar_worker_slot_restarts", labels).set(Double(worker.restarts))
            }
        }
        return registry.emitToString()
    }
}
