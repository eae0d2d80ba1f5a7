/// What the supervisor knows about one worker slot, for status pages, metrics and tests.
public struct WorkerStatus: Sendable, Equatable {
    public enum State: String, Sendable, CaseIterable {
        /// The process is starting or loading the handler.
        case starting
        /// Loaded and idle, waiting for a batch.
        case ready
        /// Loaded and running at least one batch.
        case busy
        /// Taking no new batches: finishing the ones in flight before it exits (shutdown, scale-down,
        /// recycling).
        case draining
        /// Declared hung (pings unanswered past `ping_timeout_s`, or a batch past
        /// `batch_timeout_s`): being killed.
        case hung
        /// The process ended unexpectedly; a replacement starts after a backoff.
        case dead
        /// Stopped for good (the model stopped, or the slot was removed).
        case stopped

        /// Loaded and taking batches.
        public var isServing: Bool { self == .ready || self == .busy }
    }

    /// The slot's index, also the worker index the handler sees.
    public var index: Int
    public var state: State = .starting
    public var pid: Int32?
    /// How many times this slot's process was replaced after it ended unexpectedly.
    public var restarts: Int = 0
    /// How many times this slot's process was replaced on purpose (`recycle:`).
    public var recycles: Int = 0
    /// Batches answered by the slot's processes (all lives).
    public var batchesServed: Int = 0
    /// Items answered by the slot's processes (all lives).
    public var itemsServed: Int = 0
    /// Batches the current process is running or has been sent.
    public var inFlight: Int = 0
    /// Resident memory of the current process, sampled at each ping.
    public var rssBytes: Int?
    public var pythonVersion: String?
    /// Why the last process of this slot ended, when it ended badly.
    public var lastError: String?

    public init(index: Int) { self.index = index }

    /// Adds what another process of the slot served (a past or draining one) to these counts.
    mutating func addServed(by other: WorkerStatus) {
        batchesServed += other.batchesServed
        itemsServed += other.itemsServed
    }
}
