/// What the inbox/outbox front needs of a message broker. Redis Streams is the first
/// (``RedisStreamsBroker``); a second broker (Kafka through librdkafka) is a new conformance, not a
/// change to ``InboxFront``.
///
/// The contract that makes results exactly-once on top of at-least-once delivery: ``publish(_:)``
/// writes a message's result and acknowledges it in one atomic step, and only while the message is
/// still this consumer's. A message another consumer took over (claimed after it sat idle) is not
/// published twice.
protocol InboxBroker: Sendable {
    /// Where it reads, for logs and status: "redis://host:port stream 'in' group 'sidecar'".
    var description: String { get }

    /// Makes sure the inbox and the consumer group exist; loads what publishing needs.
    func prepare() async throws

    /// New messages, never delivered before, at most `max`; waits up to `wait` for the first.
    func readNew(max: Int, wait: Duration) async throws -> [InboxMessage]

    /// Messages delivered but not acknowledged, oldest first, after the entry `after` if given:
    /// this consumer's own (`mine`: what it read before a restart), or anyone's idle for at least
    /// `minIdle`.
    func pending(mine: Bool, after: String?, minIdle: Duration, max: Int) async throws -> [PendingEntry]

    /// Takes the messages over for this consumer if they are still idle for `minIdle` (a message
    /// another node claimed first, or acknowledged, is not returned). Counts as a delivery.
    func claim(_ entries: [PendingEntry], minIdle: Duration) async throws -> [InboxMessage]

    /// Publishing calls that may run at once, each on its `lane` (0..<publishLanes).
    var publishLanes: Int { get }

    /// Publishes each outcome and acknowledges its message atomically, if the message is still this
    /// consumer's; the answer says, per outcome, whether it was published.
    func publish(_ outcomes: [InboxOutcome], lane: Int) async throws -> [Bool]

    /// Marks messages still being worked on as fresh, so that other nodes do not claim them from a
    /// node that is slow but alive. Messages no longer this consumer's are left alone.
    func keepAlive(_ entries: [String]) async throws

    /// Messages not yet delivered to the group (nil when the broker cannot say) and delivered but
    /// unacknowledged.
    func backlog() async throws -> (lag: Int?, pending: Int)

    /// Drops the connections (a broker that is reachable again is reconnected on the next call).
    func close() async
}

/// One message read from the inbox.
struct InboxMessage: Sendable {
    /// The broker's id for it (a stream entry id).
    var entry: String
    var fields: [String: [UInt8]]
    /// 1 the first time it is read; more after a restart or a claim.
    var deliveries: Int
}

/// A delivered, unacknowledged message.
struct PendingEntry: Sendable, Equatable {
    var entry: String
    var consumer: String
    var deliveries: Int
}

/// What to write for one message, then acknowledge it.
struct InboxOutcome: Sendable {
    var entry: String
    /// The result for the outbox (field, value pairs).
    var result: [(String, [UInt8])]
    /// For a message set aside: its dead letter (field, value pairs).
    var deadLetter: [(String, [UInt8])]?
}
