/// How a model name's requests are shared between its loaded versions: each version's share is its
/// weight over the sum (`stable` 90 and `canary` 10 send a tenth to the canary). A request that
/// carries a routing key (an Open Inference Protocol request id) always reaches the same version
/// while the split stays the same, so a client retrying or paging through a session sees one model.
public struct TrafficSplit: Sendable, Equatable {
    public struct Share: Sendable, Equatable, Codable {
        public var version: String
        public var weight: Int
        public var label: String?

        public init(version: String, weight: Int, label: String? = nil) {
            self.version = version
            self.weight = weight
            self.label = label
        }
    }

    /// Versions with a positive weight, in the manifest's order.
    public let shares: [Share]
    private let total: UInt64

    public init(_ shares: [Share]) {
        self.shares = shares.filter { $0.weight > 0 }
        total = self.shares.reduce(0) { $0 + UInt64($1.weight) }
    }

    /// The version with the largest share (the first on a tie): what the name means when it must
    /// mean one version (status, metadata, a reload).
    public var primary: String? { shares.max { $0.weight < $1.weight }?.version }

    /// The version that answers a request: by `key`'s hash when there is one (sticky), else at random.
    public func pick(key: String?) -> String? {
        guard total > 0 else { return nil }
        if shares.count == 1 { return shares[0].version }
        let point = key.map { Self.fnv1a($0) % total } ?? UInt64.random(in: 0..<total)
        var upTo: UInt64 = 0
        for share in shares {
            upTo += UInt64(share.weight)
            if point < upTo { return share.version }
        }
        return shares.last?.version
    }

    /// FNV-1a, 64 bits: stable across processes and nodes (Swift's `hashValue` is seeded per
    /// process), so every node sends one request id to the same version.
    static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        // Mixed once more so that keys differing only in their last character spread out.
        hash ^= hash >> 33
        hash = hash &* 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        return hash
    }
}
