import Foundation

/// How to start the workers of one model.
struct WorkerSpec: Sendable {
    let model: String
    let python: URL
    let modelDirectory: URL
    let handler: String
    let handlerConfig: JSONValue
    /// Where the workers' Unix sockets go (short: socket paths are limited to ~100 bytes).
    let socketDirectory: URL
    let timeouts: ModelConfiguration.Timeouts
    let maxMessageBytes: Int
    /// Batches one worker may have in flight.
    let window: Int
    var recycle = ModelConfiguration.Recycle()
}

/// How one worker process ended.
struct WorkerExit: Sendable {
    var becameReady: Bool
    /// The handler failed to load: the Python error and traceback.
    var loadError: PredictionError?
    /// One line: "exited with status 1", "killed by signal 9", "hung: no pong for 30 s".
    var reason: String
    /// What the process last wrote to stderr, for errors before the handler could report anything.
    var stderrTail: [String]
    /// It was asked to leave (retired, or the model stopped): not a failure.
    var retired: Bool
    /// Killed by a SIGKILL that the supervisor did not send: an operator, the OOM killer.
    var killedFromOutside = false
}

extension SlotPolicy.Exit {
    /// The facts of `exit` the policy decides on, with the number of batches it left unanswered.
    init(_ exit: WorkerExit, unanswered: Int) {
        self.init(
            becameReady: exit.becameReady, retired: exit.retired, killedFromOutside: exit.killedFromOutside,
            unanswered: unanswered, reason: exit.reason)
    }
}
