import Foundation

/// An error from Sidecar itself: bad configuration, an environment that cannot be built, a model that
/// cannot load, a full queue. Errors raised by a handler for one item are ``PredictionError``s.
///
/// The `code` is open-ended (a struct, not an enum) so that new codes never break callers' switches.
public struct SidecarError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }

        /// A model directory or its `sidecar.yaml` is invalid. Nothing was started.
        public static let invalidModel = Code(name: "invalidModel")
        /// The server's configuration (its `--config` file, an option, the admin token file) is
        /// invalid. Nothing was started.
        public static let invalidConfiguration = Code(name: "invalidConfiguration")
        /// The Python environment could not be built (venv creation or pip failed).
        public static let environmentFailed = Code(name: "environmentFailed")
        /// A worker could not start or the handler could not be loaded.
        public static let loadFailed = Code(name: "loadFailed")
        /// The model's queue is full; retry later.
        public static let queueFull = Code(name: "queueFull")
        /// The model is not serving (stopped or stopping).
        public static let unavailable = Code(name: "unavailable")
        /// No model with that name is loaded.
        public static let notFound = Code(name: "notFound")
        /// A request does not match the model's declared inputs, or its tensors are malformed.
        public static let invalidInput = Code(name: "invalidInput")
        /// A model with that name is already loaded.
        public static let conflict = Code(name: "conflict")
        /// The request's deadline passed before it was answered.
        public static let deadlineExceeded = Code(name: "deadlineExceeded")
    }

    public var code: Code
    public var message: String
    /// Extra detail a person needs to fix the problem: a Python traceback, pip's output.
    public var detail: String?
    /// The error this one reports, when it wraps one (a decoding error, a failed load), so that a
    /// caller can still look at what went wrong underneath (as grpc-swift-2's `RPCError.cause`).
    public var cause: (any Error)?

    public init(_ code: Code, _ message: String, detail: String? = nil, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.detail = detail
        self.cause = cause
    }

    public var description: String {
        guard let detail, !detail.isEmpty else { return message }
        return "\(message)\n\(detail)"
    }
}

/// Why one item got no prediction. Every other item of the same batch is unaffected unless the whole
/// batch failed (the handler raised, or returned the wrong number of results).
public struct PredictionError: Error, CustomStringConvertible, Sendable, Equatable {
    public struct Kind: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }

        /// The handler raised an exception for the batch this item was in.
        public static let handlerError = Kind(name: "handlerError")
        /// The handler returned a result count different from the batch size, or not a list.
        public static let wrongLength = Kind(name: "wrongLength")
        /// The handler's output for the item could not be serialized.
        public static let invalidItem = Kind(name: "invalidItem")
        /// The item's input could not be decoded (not JSON, a tensor no array can have): the
        /// caller's error, answered 400 / INVALID_ARGUMENT.
        public static let invalidInput = Kind(name: "invalidInput")
        /// Workers died while running the item, more often than the retry limit allows.
        public static let workerDied = Kind(name: "workerDied")
        /// The model stopped before the item ran.
        public static let unavailable = Kind(name: "unavailable")
    }

    public var kind: Kind
    /// The Python exception type (`ValueError`) or a Sidecar kind (`WrongLength`).
    public var type: String
    public var message: String
    /// The Python traceback, when the error came from Python code.
    public var traceback: String?

    public init(kind: Kind, type: String, message: String, traceback: String? = nil) {
        self.kind = kind
        self.type = type
        self.message = message
        self.traceback = traceback
    }

    public var description: String {
        "\(type): \(message)"
    }
}
