import Foundation
import Yams

/// A model's settings, read from the optional `sidecar.yaml` in its directory.
///
/// Every key is optional. Unknown keys and bad values are errors that name the file, the key and
/// what is expected, because a typo that silently falls back to a default (TorchServe's misspelled
/// `min_worker`) is worse than refusing to start.
public struct ModelConfiguration: Sendable, Equatable {
    /// The model's name (default: the directory's name).
    public var name: String
    /// The handler entry point, `module:attribute` (default `handler:predict`).
    public var handler: String
    /// The number of worker processes (default 1); with autoscaling, the number it starts with (`min`).
    public var workers: Int
    /// `workers: {min, max}`: the pool scales between the bounds on queue wait and load.
    public var autoscaling: Autoscaling?
    public var batching: Batching
    public var timeouts: Timeouts
    /// How many times an item whose worker died while running it is dispatched again before it fails.
    public var maxRetries: Int
    /// Whether items of a worker that died may run again at all (`retry: false` for handlers that
    /// must not run an item twice: those items fail with an error saying so).
    public var retry: Bool = true
    public var restartPolicy = RestartPolicy()
    public var recycle = Recycle()
    public var python: Python
    /// Free-form settings handed to the handler's context as a dict (`config:` in `sidecar.yaml`).
    public var handlerConfig: JSONValue
    /// Declared input tensors (`inputs:`); Open Inference Protocol requests must match them. Empty:
    /// any tensors are accepted.
    public var inputs: [TensorSpec] = []
    /// Declared output tensors (`outputs:`), reported in metadata.
    public var outputs: [TensorSpec] = []
    /// Where the handler runs (`executor:`): worker processes (default) or inside the server.
    public var executor: ExecutorKind = .process
    /// Requests also come from a broker's inbox, results go to its outbox (`inbox:`).
    public var inbox: InboxConfiguration?
    /// Who answers when this model cannot (`fallback:`): another loaded model or a fixed answer.
    public var fallback: Fallback?
    /// The circuit breaker (`breaker:`): off unless configured.
    public var breaker: Breaker?

    /// `fallback:` in `sidecar.yaml`.
    public struct Fallback: Sendable, Equatable {
        public enum Target: Sendable, Equatable {
            /// Another loaded model answers the same request.
            case model(String)
            /// A fixed answer: this JSON value per item for JSON requests; for tensor requests it must
            /// be `{"outputs": [{name, datatype, shape, data}]}`.
            case response(JSONValue)
        }

        public var target: Target
        /// The failures it answers for (`on:`; default all four). An open breaker always sends to it.
        public var on: Set<FallbackReason> = FallbackReason.configurable
        /// The latency budget (`after_ms`): past it the fallback answers and the primary's answer is let go.
        public var after: Duration?

        public static let keys = ["model", "response", "on", "after_ms"]
    }

    /// `breaker:` in `sidecar.yaml`: opens when at least `failureRate` of at least `minRequests`
    /// requests in the last `window` failed; after `coolDown` it lets `probes` requests through and
    /// closes if they all succeed.
    public struct Breaker: Sendable, Equatable {
        public var failureRate = 0.5
        public var minRequests = 20
        public var window: Duration = .seconds(10)
        public var coolDown: Duration = .seconds(5)
        public var probes = 3

        public init() {}

        public static let keys = ["failure_rate", "min_requests", "window_s", "cool_down_s", "probes"]
    }

    /// `executor:` in `sidecar.yaml`.
    public enum ExecutorKind: String, Sendable, Equatable, CaseIterable {
        /// Python worker processes behind bidirectional gRPC: supervised, killed and replaced when
        /// they crash or hang.
        case process
        /// The server's own CPython interpreter, one thread for the model: no hop, but a crash in
        /// native code takes the server down (see the README).
        case embedded
    }

    /// Refuses combinations that cannot run: an embedded model is one thread of the server.
    public func checkExecutor(file: String) throws {
        guard executor == .embedded else { return }
        if let autoscaling {
            throw SidecarError(
                .invalidModel,
                "\(file): 'workers' is {min: \(autoscaling.min), max: \(autoscaling.max)}, but executor: embedded runs the handler in one thread of the server; remove workers: or use executor: process to autoscale")
        }
        if workers != 1 {
            throw SidecarError(
                .invalidModel,
                "\(file): 'workers' is \(workers), but executor: embedded runs the handler in one thread of the server; set workers: 1 or use executor: process for \(workers) worker processes")
        }
    }

    /// How many worker processes one model may have: `workers`, `workers.min/max`, `sidecar scale`,
    /// `--workers` and the admin API all check against it.
    public static let workerRange = 1...256

    /// Whether `name` may name a model: letters, digits, `-`, `_` and `.` (it appears in URLs, metric
    /// labels and file names), and not `.` or `..`.
    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name != "." && name != ".." && name.count <= 200
            && name.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) }
    }

    public struct Batching: Sendable, Equatable {
        /// The most items one batch may carry (default 64).
        public var maxBatchSize: Int = 64
        /// How long a free worker waits for a batch to fill, counted from the oldest queued item's
        /// arrival (default 0: a free worker takes whatever is queued at once).
        public var maxDelay: Duration = .zero
        /// The most items that may wait in the queue; past it requests are refused (default 10000).
        public var maxQueue: Int = 10_000
        /// Adaptive admission: keep the queueing delay of accepted requests near this, refusing at
        /// arrival what the workers would not reach in time (nil: `max_queue` alone). See ``Admission``.
        public var targetQueueDelay: Duration?
    }

    public struct Timeouts: Sendable, Equatable {
        /// How long a worker may take to load the handler and say it is ready (default 120 s).
        public var startup: Duration = .seconds(120)
        /// How often the supervisor pings each worker's Python loop (default 1 s).
        public var pingInterval: Duration = .seconds(1)
        /// How long a worker may leave a ping unanswered before it is declared hung (default 30 s).
        public var pingTimeout: Duration = .seconds(30)
        /// On shutdown, how long in-flight batches may run before workers are killed (default 30 s).
        public var shutdownGrace: Duration = .seconds(30)
        /// How long one batch may run before its worker is declared stuck, killed and replaced
        /// (the progress check; default 300 s).
        public var batch: Duration = .seconds(300)
        /// The deadline of a request that brings none (nil, the default: no deadline).
        public var request: Duration?
    }

    /// The crash-loop breaker: `maxFailures` worker failures within `window` mark the model FAILED
    /// instead of restarting forever. Deaths while running a batch do not count (the batch is the
    /// suspect, and poison isolation deals with it).
    public struct RestartPolicy: Sendable, Equatable {
        public var maxFailures: Int = 5
        public var window: Duration = .seconds(60)
        /// The longest wait between restarts of one worker slot (the backoff doubles up to it).
        public var maxBackoff: Duration = .seconds(30)
    }

    /// Bounds and thresholds of autoscaling (`workers: {min, max, ...}`).
    public struct Autoscaling: Sendable, Equatable {
        public var min: Int
        public var max: Int
        /// Scale up when items wait longer than this in the queue (p99 over the last second), or
        /// when more is queued than the workers take in one round.
        public var targetQueueWait: Duration = .milliseconds(50)
        /// Scale down after this long with an empty queue and workers busy less than half the time.
        public var scaleDownAfter: Duration = .seconds(30)

        public init(min: Int, max: Int) {
            self.min = min
            self.max = max
        }
    }

    /// When a worker is replaced gracefully (its successor is ready before it drains).
    public struct Recycle: Sendable, Equatable {
        /// Items a worker handles before it is replaced (0: never).
        public var maxRequests: Int = 0
        /// Up to this many more, drawn at random per worker, so workers do not recycle in lockstep.
        public var maxRequestsJitter: Int = 0
        /// Resident memory (MiB) past which a worker is replaced (0: never).
        public var maxRSSMegabytes: Int = 0
    }

    public struct Python: Sendable, Equatable {
        /// The interpreter for the model's virtual environment; nil means the one that matches the
        /// system libpython (see ``PythonEnvironment``).
        public var interpreter: String?
        /// Extra arguments for `pip install`, e.g. `["--no-index", "--find-links", "/wheels"]`.
        public var pipArgs: [String] = []
    }

    /// The configuration a directory gets when it has no `sidecar.yaml`.
    public static func defaults(name: String) -> ModelConfiguration {
        ModelConfiguration(
            name: name, handler: "handler:predict", workers: 1, batching: Batching(),
            timeouts: Timeouts(), maxRetries: 2, python: Python(), handlerConfig: JSONValue(trusted: Data("{}".utf8)))
    }

    /// Reads the `inboxes.MODEL` block of the server's configuration file at `file`.
    public static func parseInbox(_ node: Yams.Node, key: String, file: String) throws -> InboxConfiguration {
        try ConfigReader(file: file, code: .invalidConfiguration).inbox(node, key: key)
    }

    /// Parses `yaml`, the text of the file at `file` (named in errors).
    public static func parse(yaml: String, file: String, defaultName: String) throws -> ModelConfiguration {
        var parser = ConfigReader(file: file)
        return try parser.read(yaml: yaml, defaultName: defaultName)
    }
}

/// Walks the YAML tree with the path of the current key, so every error can say where it is.
private struct ConfigReader {
    let file: String
    /// `invalidModel` for a `sidecar.yaml`, `invalidConfiguration` for the server's file.
    var code: SidecarError.Code = .invalidModel

    func fail(_ key: String, _ expected: String, got node: Yams.Node?) -> SidecarError {
        let line = node?.mark.map { " (line \($0.line))" } ?? ""
        let got = node.map { " got \(describe($0))" } ?? ""
        return SidecarError(code, "\(file)\(line): '\(key)' must be \(expected);\(got)")
    }

    func describe(_ node: Yams.Node) -> String {
        switch node {
        case .scalar(let scalar): return "'\(scalar.string)'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    func mapping(_ node: Yams.Node, key: String, allowed: [String]) throws -> [(String, Yams.Node)] {
        guard let mapping = node.mapping else {
            throw fail(key.isEmpty ? "the top level" : key, "a mapping of keys", got: node)
        }
        var pairs: [(String, Yams.Node)] = []
        for (k, v) in mapping {
            guard let name = k.string else { throw fail(key, "a mapping with string keys", got: k) }
            let path = key.isEmpty ? name : "\(key).\(name)"
            guard allowed.contains(name) else {
                let line = k.mark.map { " (line \($0.line))" } ?? ""
                throw SidecarError(
                    code,
                    "\(file)\(line): unknown key '\(path)'; expected one of: \(allowed.joined(separator: ", "))")
            }
            pairs.append((name, v))
        }
        return pairs
    }

    func string(_ node: Yams.Node, key: String) throws -> String {
        guard case .scalar(let scalar) = node, !scalar.string.isEmpty else { throw fail(key, "a non-empty string", got: node) }
        return scalar.string
    }

    func int(_ node: Yams.Node, key: String, range: ClosedRange<Int>) throws -> Int {
        guard case .scalar = node, let value = node.int, range.contains(value) else {
            throw fail(key, "an integer from \(range.lowerBound) to \(range.upperBound)", got: node)
        }
        return value
    }

    func seconds(_ node: Yams.Node, key: String, milliseconds: Bool = false, allowZero: Bool = false) throws -> Duration {
        // At most a year: a longer duration means nothing to a worker or a batch, and converting a
        // huge float to an integer count would trap.
        let limit = Double(Duration.longestTimeout.components.seconds) * (milliseconds ? 1000 : 1)
        guard case .scalar = node, let value = node.float, value.isFinite, value > 0 || (allowZero && value == 0), value <= limit else {
            let unit = milliseconds ? "milliseconds" : "seconds"
            let range = "up to \(Int(limit)) (a year)"
            throw fail(key, allowZero ? "a number of \(unit), 0 or more, \(range)" : "a positive number of \(unit) \(range)", got: node)
        }
        return milliseconds ? .microseconds(Int64(value * 1000)) : .milliseconds(Int64(value * 1000))
    }

    /// An `inbox:` block (``InboxConfiguration``), in a `sidecar.yaml` or the server's `inboxes:`.
    func inbox(_ node: Yams.Node, key: String) throws -> InboxConfiguration {
        var broker: String?
        var stream: String?
        var outbox: String?
        var settings = InboxConfiguration(broker: "", stream: "", outbox: "")
        for (k, v) in try mapping(node, key: key, allowed: InboxConfiguration.keys) {
            let path = "\(key).\(k)"
            switch k {
            case "broker":
                let url = try string(v, key: path)
                guard url.hasPrefix("redis://") else { throw fail(path, "a redis://[:password@]host[:port][/db] URL (Redis Streams is the broker)", got: v) }
                broker = url
            case "stream": stream = try string(v, key: path)
            case "outbox": outbox = try string(v, key: path)
            case "group": settings.group = try string(v, key: path)
            case "consumer": settings.consumer = try string(v, key: path)
            case "dead_letter": settings.deadLetter = try string(v, key: path)
            case "max_deliveries": settings.maxDeliveries = try int(v, key: path, range: 1...1_000)
            case "claim_idle_s": settings.claimIdle = try seconds(v, key: path)
            default: settings.maxInFlight = try int(v, key: path, range: 1...1_000_000)  // max_in_flight
            }
        }
        for (name, value) in [("broker", broker), ("stream", stream), ("outbox", outbox)] where value == nil {
            throw SidecarError(code, "\(file): '\(key).\(name)' is required (the inbox needs broker, stream and outbox)")
        }
        settings.broker = broker!
        settings.stream = stream!
        settings.outbox = outbox!
        guard settings.outbox != settings.stream, settings.deadLetterStream != settings.stream else {
            throw SidecarError(code, "\(file): '\(key).outbox' and '\(key).dead_letter' must differ from '\(key).stream'")
        }
        return settings
    }

    mutating func read(yaml: String, defaultName: String) throws -> ModelConfiguration {
        var config = ModelConfiguration.defaults(name: defaultName)
        let root: Yams.Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            throw SidecarError(.invalidModel, "\(file): not valid YAML: \(error)")
        }
        guard let root else { return config }  // an empty file means all defaults
        let top = [
            "name", "handler", "workers", "max_retries", "retry", "restart_policy", "recycle", "batching", "timeouts", "python",
            "config", "inputs", "outputs", "executor", "inbox", "fallback", "breaker",
        ]
        for (key, value) in try mapping(root, key: "", allowed: top) {
            switch key {
            case "name":
                let name = try string(value, key: key)
                guard ModelConfiguration.isValidName(name) else {
                    throw fail(key, "letters, digits, '-', '_' or '.', at most 200 (it appears in URLs)", got: value)
                }
                config.name = name
            case "handler":
                let entry = try string(value, key: key)
                let parts = entry.split(separator: ":", omittingEmptySubsequences: false)
                guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                    throw fail(key, "an entry point 'module:attribute', e.g. 'handler:predict'", got: value)
                }
                config.handler = entry
            case "workers":
                if value.mapping != nil {
                    var lower: Int?
                    var upper: Int?
                    var wait: Duration?
                    var down: Duration?
                    for (k, v) in try mapping(value, key: key, allowed: ["min", "max", "target_queue_ms", "scale_down_after_s"]) {
                        let path = "workers.\(k)"
                        switch k {
                        case "min": lower = try int(v, key: path, range: ModelConfiguration.workerRange)
                        case "max": upper = try int(v, key: path, range: ModelConfiguration.workerRange)
                        case "target_queue_ms": wait = try seconds(v, key: path, milliseconds: true)
                        default: down = try seconds(v, key: path)
                        }
                    }
                    guard let lower, let upper, lower <= upper else {
                        throw fail(key, "a number of workers, or {min: N, max: M} with min <= max", got: value)
                    }
                    var autoscaling = ModelConfiguration.Autoscaling(min: lower, max: upper)
                    if let wait { autoscaling.targetQueueWait = wait }
                    if let down { autoscaling.scaleDownAfter = down }
                    config.autoscaling = autoscaling
                    config.workers = lower
                } else {
                    config.workers = try int(value, key: key, range: ModelConfiguration.workerRange)
                }
            case "max_retries":
                config.maxRetries = try int(value, key: key, range: 0...100)
            case "retry":
                guard case .scalar = value, let flag = value.bool else { throw fail(key, "true or false", got: value) }
                config.retry = flag
            case "restart_policy":
                for (k, v) in try mapping(value, key: key, allowed: ["max_failures", "window_s", "max_backoff_s"]) {
                    let path = "restart_policy.\(k)"
                    switch k {
                    case "max_failures": config.restartPolicy.maxFailures = try int(v, key: path, range: 1...10_000)
                    case "window_s": config.restartPolicy.window = try seconds(v, key: path)
                    default: config.restartPolicy.maxBackoff = try seconds(v, key: path)
                    }
                }
            case "recycle":
                for (k, v) in try mapping(value, key: key, allowed: ["max_requests", "max_requests_jitter", "max_rss_mb"]) {
                    let path = "recycle.\(k)"
                    switch k {
                    case "max_requests": config.recycle.maxRequests = try int(v, key: path, range: 0...Int(Int32.max))
                    case "max_requests_jitter": config.recycle.maxRequestsJitter = try int(v, key: path, range: 0...Int(Int32.max))
                    default: config.recycle.maxRSSMegabytes = try int(v, key: path, range: 0...10_000_000)
                    }
                }
            case "batching":
                for (k, v) in try mapping(value, key: key, allowed: ["max_batch_size", "max_delay_ms", "max_queue", "target_queue_delay_ms"]) {
                    let path = "batching.\(k)"
                    switch k {
                    case "max_batch_size": config.batching.maxBatchSize = try int(v, key: path, range: 1...65_536)
                    case "max_delay_ms": config.batching.maxDelay = try seconds(v, key: path, milliseconds: true, allowZero: true)
                    case "target_queue_delay_ms": config.batching.targetQueueDelay = try seconds(v, key: path, milliseconds: true)
                    default: config.batching.maxQueue = try int(v, key: path, range: 1...100_000_000)
                    }
                }
            case "timeouts":
                let keys = ["startup_s", "ping_interval_s", "ping_timeout_s", "shutdown_grace_s", "batch_timeout_s", "request_timeout_s"]
                for (k, v) in try mapping(value, key: key, allowed: keys) {
                    let d = try seconds(v, key: "timeouts.\(k)")
                    switch k {
                    case "startup_s": config.timeouts.startup = d
                    case "ping_interval_s": config.timeouts.pingInterval = d
                    case "ping_timeout_s": config.timeouts.pingTimeout = d
                    case "batch_timeout_s": config.timeouts.batch = d
                    case "request_timeout_s": config.timeouts.request = d
                    default: config.timeouts.shutdownGrace = d
                    }
                }
            case "python":
                for (k, v) in try mapping(value, key: key, allowed: ["interpreter", "pip_args"]) {
                    if k == "interpreter" {
                        config.python.interpreter = try string(v, key: "python.interpreter")
                    } else {
                        guard case .sequence(let seq) = v else { throw fail("python.pip_args", "a list of strings", got: v) }
                        config.python.pipArgs = try seq.map { try string($0, key: "python.pip_args") }
                    }
                }
            case "executor":
                guard let kind = ModelConfiguration.ExecutorKind(rawValue: try string(value, key: key)) else {
                    throw fail(key, "one of \(ModelConfiguration.ExecutorKind.allCases.map(\.rawValue).joined(separator: ", "))", got: value)
                }
                config.executor = kind
            case "inbox":
                config.inbox = try inbox(value, key: key)
            case "fallback":
                config.fallback = try fallback(value, key: key)
            case "breaker":
                config.breaker = try breaker(value, key: key)
            case "inputs", "outputs":
                let specs = try tensorSpecs(value, key: key)
                if key == "inputs" { config.inputs = specs } else { config.outputs = specs }
            default:  // config
                guard value.mapping != nil else { throw fail(key, "a mapping (handed to the handler as a dict)", got: value) }
                let object = try jsonObject(value, key: key)
                config.handlerConfig = JSONValue(trusted: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
            }
        }
        try config.checkExecutor(file: file)
        return config
    }

    /// A `fallback:` block: exactly one of `model` and `response`, optional `on` and `after_ms`.
    func fallback(_ node: Yams.Node, key: String) throws -> ModelConfiguration.Fallback {
        var target: ModelConfiguration.Fallback.Target?
        var on = FallbackReason.configurable
        var after: Duration?
        for (k, v) in try mapping(node, key: key, allowed: ModelConfiguration.Fallback.keys) {
            let path = "\(key).\(k)"
            switch k {
            case "model", "response":
                guard target == nil else { throw fail(key, "either 'model' or 'response', not both", got: node) }
                if k == "model" {
                    let name = try string(v, key: path)
                    guard ModelConfiguration.isValidName(name) else { throw fail(path, "a model name", got: v) }
                    target = .model(name)
                } else {
                    let object = try jsonObject(v, key: path)
                    target = .response(JSONValue(trusted: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .fragmentsAllowed])))
                }
            case "on":
                let allowed = FallbackReason.configurable.map(\.rawValue).sorted()
                guard case .sequence(let seq) = v, !seq.isEmpty else { throw fail(path, "a list of: \(allowed.joined(separator: ", "))", got: v) }
                on = try Set(seq.map { element in
                    guard let reason = FallbackReason(rawValue: try string(element, key: path)), FallbackReason.configurable.contains(reason) else {
                        throw fail(path, "a list of: \(allowed.joined(separator: ", "))", got: element)
                    }
                    return reason
                })
            default:  // after_ms
                after = try seconds(v, key: path, milliseconds: true)
            }
        }
        guard let target else { throw SidecarError(code, "\(file): '\(key)' needs 'model' (a loaded model that answers instead) or 'response' (a fixed answer)") }
        var fallback = ModelConfiguration.Fallback(target: target, on: on, after: after)
        if after != nil { fallback.on.insert(.timeout) }
        return fallback
    }

    /// A `breaker:` block.
    func breaker(_ node: Yams.Node, key: String) throws -> ModelConfiguration.Breaker {
        var breaker = ModelConfiguration.Breaker()
        for (k, v) in try mapping(node, key: key, allowed: ModelConfiguration.Breaker.keys) {
            let path = "\(key).\(k)"
            switch k {
            case "failure_rate":
                guard case .scalar = v, let rate = v.float, rate > 0, rate <= 1 else { throw fail(path, "a share of requests above 0 and at most 1 (0.5: half)", got: v) }
                breaker.failureRate = rate
            case "min_requests": breaker.minRequests = try int(v, key: path, range: 1...1_000_000)
            case "window_s":
                breaker.window = try seconds(v, key: path)
                guard breaker.window >= .milliseconds(100) else { throw fail(path, "at least 0.1 seconds", got: v) }
            case "cool_down_s": breaker.coolDown = try seconds(v, key: path)
            default: breaker.probes = try int(v, key: path, range: 1...10_000)
            }
        }
        return breaker
    }

    /// A list of `{name, datatype, shape}` mappings.
    func tensorSpecs(_ node: Yams.Node, key: String) throws -> [TensorSpec] {
        guard case .sequence(let seq) = node else {
            throw fail(key, "a list of {name, datatype, shape} mappings", got: node)
        }
        var specs: [TensorSpec] = []
        for (index, element) in seq.enumerated() {
            let path = "\(key)[\(index)]"
            var name: String?
            var datatype: TensorDataType?
            var shape: [Int]?
            for (k, v) in try mapping(element, key: path, allowed: ["name", "datatype", "shape"]) {
                switch k {
                case "name": name = try string(v, key: "\(path).name")
                case "datatype":
                    let text = try string(v, key: "\(path).datatype")
                    guard let type = TensorDataType(rawValue: text.uppercased()) else {
                        throw fail("\(path).datatype", "one of \(TensorDataType.allCases.map(\.rawValue).joined(separator: ", "))", got: v)
                    }
                    datatype = type
                default:
                    guard case .sequence(let dims) = v else { throw fail("\(path).shape", "a list of dimensions (-1 for any size)", got: v) }
                    shape = try dims.map { try int($0, key: "\(path).shape", range: -1...Int(Int32.max)) }
                }
            }
            guard let name, let datatype, let shape else {
                throw fail(path, "a mapping with name, datatype and shape", got: element)
            }
            guard !specs.contains(where: { $0.name == name }) else { throw fail("\(path).name", "unique within \(key)", got: element) }
            specs.append(TensorSpec(name: name, datatype: datatype, shape: shape))
        }
        return specs
    }

    /// YAML → Foundation objects that JSONSerialization accepts, keeping YAML's scalar types.
    func jsonObject(_ node: Yams.Node, key: String) throws -> Any {
        switch node {
        case .mapping(let mapping):
            var dict: [String: Any] = [:]
            for (k, v) in mapping {
                guard let name = k.string else { throw fail(key, "a mapping with string keys", got: k) }
                dict[name] = try jsonObject(v, key: "\(key).\(name)")
            }
            return dict
        case .sequence(let seq):
            return try seq.map { try jsonObject($0, key: key) }
        case .scalar(let scalar):
            if scalar.style == .plain {
                if node.null != nil { return NSNull() }
                if let b = node.bool { return b }
                if let i = node.int { return i }
                if let f = node.float, f.isFinite { return f }
            }
            return scalar.string
        case .alias:
            throw fail(key, "plain values (YAML aliases are not supported)", got: node)
        }
    }
}
