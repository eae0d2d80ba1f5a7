import Foundation

/// Where a model's requests also come from, and where their results go: a stream on a broker
/// (`inbox:` in `sidecar.yaml`, or `inboxes.MODEL` in the server's configuration, which wins).
/// The server's inbox front reads it; every default is decided here, so status and docs agree.
public struct InboxConfiguration: Sendable, Equatable {
    public static let keys = ["broker", "stream", "outbox", "group", "consumer", "dead_letter", "max_deliveries", "claim_idle_s", "max_in_flight"]

    /// `redis://[:password@]host[:port][/db]`.
    public var broker: String
    /// The inbox stream.
    public var stream: String
    /// Where results go.
    public var outbox: String
    /// The consumer group the nodes share.
    public var group: String = "sidecar"
    /// This node's name in the group (nil: the host name, which a Kubernetes StatefulSet keeps
    /// across restarts). A restarted node re-reads what it had read under this name.
    public var consumer: String?
    /// Where messages set aside go (nil: `<stream>-dead`).
    public var deadLetter: String?
    /// A message delivered more often than this (it kills or hangs the server) is set aside.
    public var maxDeliveries: Int = 5
    /// Messages another consumer left pending this long are claimed (nil: derived from the batch
    /// timeout, ``claimIdle(batchTimeout:)``).
    public var claimIdle: Duration?
    /// Messages read and not yet answered, at most (nil: `min(max_queue, 4096)`; a read takes a quarter).
    public var maxInFlight: Int?

    public init(broker: String, stream: String, outbox: String) {
        self.broker = broker
        self.stream = stream
        self.outbox = outbox
    }

    public var deadLetterStream: String { deadLetter ?? "\(stream)-dead" }

    public var consumerName: String { consumer ?? ProcessInfo.processInfo.hostName }

    /// A live node keeps the messages it works on fresh (every third of this), so the limit only
    /// has to tell a dead or stopped node: the batch timeout, within 5 to 30 seconds.
    public func claimIdle(batchTimeout: Duration) -> Duration {
        claimIdle ?? min(.seconds(30), max(.seconds(5), batchTimeout))
    }

    public func maxInFlight(maxQueue: Int) -> Int { maxInFlight ?? min(maxQueue, 4096) }
}
