/// What the supervisor knows about one worker slot, for status pages, metrics and tests.
public struct WorkerStatus: Sendable, Equatable {
    public enum State: String, Sendable {
        /// The process is starting or loading the handler.
        case starting
        /// Loaded and taking batches.
        case ready
        /// Finishing its in-flight batches before it exits.
        case draining
        /// Not running: waiting to be restarted, or stopped.
        case stopped
    }

    /// The slot's index, also the worker index the handler sees.
    public var index: Int
    public var state: State = .starting
    public var pid: Int32?
    /// How many times this slot's process was replaced.
    public var restarts: Int = 0
    public var batchesServed: Int = 0
    public var pythonVersion: String?
    /// Why the last process of this slot ended, when it ended badly.
    public var lastError: String?

    public init(index: Int) { self.index = index }
}
