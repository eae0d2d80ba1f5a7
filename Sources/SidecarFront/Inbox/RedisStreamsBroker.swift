import Crypto
import Foundation

/// The inbox as a Redis stream read by a consumer group, the outbox and the dead letters as streams.
///
/// Connections: one blocks in `XREADGROUP … BLOCK` for new messages, one claims and looks at
/// pending entries, and ``publishLanes`` publish, so a read that waits never holds up a result and
/// one publish pipeline is sent while the broker answers another.
final class RedisStreamsBroker: InboxBroker {
    let address: RedisAddress
    let stream: String
    let group: String
    let consumer: String
    let outbox: String
    let deadLetters: String
    private let reader: RedisConnection
    private let writer: RedisConnection
    private let publishers: [RedisConnection]
    /// Publish pipelines in flight at once. Two keep the broker busy while the replies of one are
    /// read and the next is built (measured: one lane left it idle a third of the time).
    let publishLanes = 2
    /// The arguments every publish call starts with: EVALSHA sha 3 inbox outbox dead group consumer.
    private let publishPrefix: [[UInt8]]

    init(address: RedisAddress, stream: String, group: String, consumer: String, outbox: String, deadLetters: String) {
        self.address = address
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.outbox = outbox
        self.deadLetters = deadLetters
        self.reader = RedisConnection(address: address, name: "sidecar-inbox-r")
        self.writer = RedisConnection(address: address, name: "sidecar-inbox-w")
        self.publishers = (0..<publishLanes).map { RedisConnection(address: address, name: "sidecar-inbox-p\($0)") }
        self.publishPrefix = ["EVALSHA", Self.publishScript.sha, "3", stream, outbox, deadLetters, group, consumer].map { Array($0.utf8) }
    }

    var description: String { "\(address) stream '\(stream)' group '\(group)' consumer '\(consumer)'" }

    func prepare() async throws {
        // From id 0: messages put in the inbox before the first server started are served too.
        do {
            _ = try await writer.command(["XGROUP", "CREATE", stream, group, "0", "MKSTREAM"])
        } catch let error as BrokerError where error.kind == .reply && error.message.hasPrefix("BUSYGROUP") {
            // The group exists: other nodes, or this one before a restart.
        }
        for script in [Self.publishScript, Self.keepAliveScript] {
            _ = try await writer.command(["SCRIPT", "LOAD", script.source])
        }
    }

    func readNew(max: Int, wait: Duration) async throws -> [InboxMessage] {
        let milliseconds = Swift.max(1, Self.milliseconds(wait))
        let reply = try await reader.command(
            ["XREADGROUP", "GROUP", group, consumer, "COUNT", String(max), "BLOCK", String(milliseconds), "STREAMS", stream, ">"],
            extraWait: wait)
        // [[stream, [[id, [field, value, …]], …]]], or nil when nothing came within `wait`.
        guard let streams = reply.elements, let first = streams.first?.elements, first.count == 2, let entries = first[1].elements else { return [] }
        return entries.compactMap { Self.message($0, deliveries: 1) }
    }

    func pending(mine: Bool, after: String?, minIdle: Duration, max: Int) async throws -> [PendingEntry] {
        var arguments = ["XPENDING", stream, group]
        if !mine { arguments += ["IDLE", String(Self.milliseconds(minIdle))] }
        // "(" makes the start exclusive (Redis 6.2 and later).
        arguments += [after.map { "(" + $0 } ?? "-", "+", String(max)]
        if mine { arguments.append(consumer) }
        let reply = try await writer.command(arguments)
        // [[id, consumer, idle ms, deliveries], …]
        return (reply.elements ?? []).compactMap { row in
            guard let fields = row.elements, fields.count == 4, let entry = fields[0].text, let owner = fields[1].text, let count = fields[3].int else { return nil }
            return PendingEntry(entry: entry, consumer: owner, deliveries: count)
        }
    }

    func claim(_ entries: [PendingEntry], minIdle: Duration) async throws -> [InboxMessage] {
        guard !entries.isEmpty else { return [] }
        let reply = try await writer.command(["XCLAIM", stream, group, consumer, String(Self.milliseconds(minIdle))] + entries.map(\.entry))
        let counts = Dictionary(entries.map { ($0.entry, $0.deliveries) }, uniquingKeysWith: max)
        // Entries deleted from the stream meanwhile come back as nil (and leave the pending list).
        return (reply.elements ?? []).compactMap { element in
            guard let fields = element.elements, let entry = fields.first?.text else { return nil }
            return Self.message(element, deliveries: (counts[entry] ?? 0) + 1)
        }
    }

    func publish(_ outcomes: [InboxOutcome], lane: Int) async throws -> [Bool] {
        let writer = publishers[lane % publishers.count]
        guard !outcomes.isEmpty else { return [] }
        let commands: [[[UInt8]]] = outcomes.map { outcome in
            var command = publishPrefix
            command.append(Array(outcome.entry.utf8))
            command.append(Array(String(outcome.result.count).utf8))
            for (field, value) in outcome.result + (outcome.deadLetter ?? []) {
                command.append(Array(field.utf8))
                command.append(value)
            }
            return command
        }
        var replies = try await writer.pipeline(commands)
        // A broker that restarted has forgotten the scripts: load them again, redo those calls.
        if replies.contains(where: Self.isNoScript) {
            _ = try await writer.command(["SCRIPT", "LOAD", Self.publishScript.source])
            let redo = replies.indices.filter { Self.isNoScript(replies[$0]) }
            let again = try await writer.pipeline(redo.map { commands[$0] })
            for (index, reply) in zip(redo, again) { replies[index] = reply }
        }
        return try replies.map { reply in
            if case .error(let message) = reply { throw BrokerError(kind: .reply, message: "publishing a result: \(message)") }
            return reply.int == 1
        }
    }

    func keepAlive(_ entries: [String]) async throws {
        guard !entries.isEmpty else { return }
        let arguments = ["EVALSHA", Self.keepAliveScript.sha, "1", stream, group, consumer] + entries
        let reply = try await writer.pipeline([arguments.map { Array($0.utf8) }])[0]
        if Self.isNoScript(reply) {
            _ = try await writer.command(["SCRIPT", "LOAD", Self.keepAliveScript.source])
            _ = try await writer.command(arguments)
        } else if case .error(let message) = reply {
            throw BrokerError(kind: .reply, message: "keeping messages alive: \(message)")
        }
    }

    func backlog() async throws -> (lag: Int?, pending: Int) {
        let reply = try await writer.command(["XINFO", "GROUPS", stream])
        for info in reply.elements ?? [] {
            // Each group is a flat list of name, value pairs.
            guard let pairs = info.elements else { continue }
            var values: [String: RedisReply] = [:]
            for index in stride(from: 0, to: pairs.count - 1, by: 2) {
                if let key = pairs[index].text { values[key] = pairs[index + 1] }
            }
            guard values["name"]?.text == group else { continue }
            return (values["lag"]?.int, values["pending"]?.int ?? 0)
        }
        return (nil, 0)
    }

    func close() async {
        await reader.close()
        await writer.close()
        for publisher in publishers { await publisher.close() }
    }

    // MARK: - Wire details

    private static func milliseconds(_ duration: Duration) -> Int {
        Int(duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
    }

    private static func isNoScript(_ reply: RedisReply) -> Bool {
        if case .error(let message) = reply { return message.hasPrefix("NOSCRIPT") }
        return false
    }

    /// `[id, [field, value, …]]` as a message.
    private static func message(_ element: RedisReply, deliveries: Int) -> InboxMessage? {
        guard let parts = element.elements, parts.count == 2, let entry = parts[0].text, let flat = parts[1].elements else { return nil }
        var fields: [String: [UInt8]] = [:]
        for index in stride(from: 0, to: flat.count - 1, by: 2) {
            guard let key = flat[index].text, case .string(let value) = flat[index + 1] else { continue }
            fields[key] = value
        }
        return InboxMessage(entry: entry, fields: fields, deliveries: deliveries)
    }

    struct Script {
        let source: String
        /// Computed once: EVALSHA sends it with every call.
        let sha: String

        init(source: String) {
            self.source = source
            self.sha = Insecure.SHA1.hash(data: Data(source.utf8)).map { String(format: "%02x", $0) }.joined()
        }
    }

    /// The result and the acknowledgement in one step, only while the message is still this
    /// consumer's: a message another node claimed (it will publish it) gets no second result.
    /// Redis does not undo a script that fails half-way, so the dead letter (the write that can
    /// fail on a key of another type) goes first and the result only after it.
    /// KEYS: inbox, outbox, dead letters. ARGV: group, consumer, entry, the number n of result
    /// pairs, the n result pairs, then the dead letter's pairs if any.
    static let publishScript = Script(source: """
        local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
        if #mine == 0 then return 0 end
        local n = tonumber(ARGV[4])
        if #ARGV > 4 + 2 * n then
          local dead = {}
          for i = 5 + 2 * n, #ARGV do dead[#dead + 1] = ARGV[i] end
          redis.call('XADD', KEYS[3], '*', unpack(dead))
        end
        local result = {}
        for i = 5, 4 + 2 * n do result[#result + 1] = ARGV[i] end
        redis.call('XADD', KEYS[2], '*', unpack(result))
        redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
        return 1
        """)

    /// Resets the idle time of the entries still this consumer's (XCLAIM … JUSTID does not count a
    /// delivery). KEYS: inbox. ARGV: group, consumer, entries.
    static let keepAliveScript = Script(source: """
        local kept = 0
        for i = 3, #ARGV do
          local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
          if #mine > 0 then
            redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
            kept = kept + 1
          end
        end
        return kept
        """)
}
