import CHiredis
import Foundation
import Sidecar

/// One reply of Redis, copied out of hiredis's reply object (which is freed at once).
enum RedisReply: Sendable, Equatable {
    case string([UInt8])
    case status(String)
    case integer(Int)
    case array([RedisReply])
    case null
    case error(String)

    var text: String? {
        switch self {
        case .string(let bytes): String(decoding: bytes, as: UTF8.self)
        case .status(let s): s
        case .integer(let n): String(n)
        default: nil
        }
    }

    var elements: [RedisReply]? { if case .array(let items) = self { items } else { nil } }

    var int: Int? {
        switch self {
        case .integer(let n): n
        case .string, .status: text.flatMap { Int($0) }
        default: nil
        }
    }
}

/// A broker operation that failed: `connection` when the link is gone (or was never made), so the
/// caller reconnects and retries; `reply` when the server answered with an error.
struct BrokerError: Error, CustomStringConvertible {
    enum Kind { case connection, reply }
    let kind: Kind
    let message: String
    var description: String { message }
}

/// Where a Redis server is: `redis://[:password@]host[:port][/db]`.
struct RedisAddress: Sendable, Equatable, CustomStringConvertible {
    var host: String
    var port: Int
    var password: String?
    var database: Int

    /// Nil, with the reason, for anything else than that form.
    static func parse(_ text: String) -> Result<RedisAddress, SidecarError> {
        guard let url = URLComponents(string: text), url.scheme == "redis", let host = url.host, !host.isEmpty else {
            return .failure(SidecarError(.invalidConfiguration, "'\(text)' is not a redis://[:password@]host[:port][/db] URL"))
        }
        let port = url.port ?? 6379
        guard (1...65_535).contains(port) else { return .failure(SidecarError(.invalidConfiguration, "'\(text)': port \(port) is out of range")) }
        let path = url.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        guard path.isEmpty || Int(path).map({ (0...1_000).contains($0) }) == true else {
            return .failure(SidecarError(.invalidConfiguration, "'\(text)': the database must be a number, got '\(path)'"))
        }
        return .success(RedisAddress(host: host, port: port, password: url.password ?? url.user.flatMap { $0.isEmpty ? nil : $0 }, database: Int(path) ?? 0))
    }

    /// Never prints the password.
    var description: String { "redis://\(host):\(port)\(database == 0 ? "" : "/\(database)")" }
}

/// One connection to Redis through hiredis's synchronous API, on a thread of its own: its calls
/// block (a `BLOCK` read for up to a second), so they must not run on Swift's cooperative pool.
/// Calls are serialized by that thread; a lost link is reconnected on the next call.
final class RedisConnection: @unchecked Sendable {
    let address: RedisAddress
    /// The socket timeout for every call beyond a blocking read's own wait.
    private let timeout: Duration
    private let thread: DedicatedThread
    // Touched only on `thread`.
    private var context: UnsafeMutablePointer<redisContext>?

    init(address: RedisAddress, name: String, timeout: Duration = .seconds(5)) {
        self.address = address
        self.timeout = timeout
        self.thread = DedicatedThread(name: String(name.prefix(15)), stackSize: 1 << 20)
    }

    deinit {
        thread.finish()
        if let context { redisFree(context) }
    }

    /// Sends `commands` in one write and reads their replies in order (a pipeline). `extraWait`
    /// lengthens the socket timeout for a blocking command. An error reply is returned, not thrown;
    /// a lost link throws ``BrokerError`` `.connection` (whether the commands ran is then unknown).
    func pipeline(_ commands: [[[UInt8]]], extraWait: Duration = .zero) async throws -> [RedisReply] {
        let outcome = await thread.run(ifFinished: Result<[RedisReply], BrokerError>.failure(BrokerError(kind: .connection, message: "the connection is closed"))) {
            self.run(commands, extraWait: extraWait)
        }
        return try outcome.get()
    }

    /// One command; an error reply throws ``BrokerError`` `.reply`.
    func command(_ arguments: [String], extraWait: Duration = .zero) async throws -> RedisReply {
        let reply = try await pipeline([arguments.map { Array($0.utf8) }], extraWait: extraWait)[0]
        if case .error(let message) = reply { throw BrokerError(kind: .reply, message: message) }
        return reply
    }

    /// Drops the link; the next call connects again.
    func close() async {
        _ = await thread.run(ifFinished: ()) {
            if let context = self.context { redisFree(context) }
            self.context = nil
        }
    }

    // MARK: on the thread

    private func run(_ commands: [[[UInt8]]], extraWait: Duration) -> Result<[RedisReply], BrokerError> {
        do {
            let context = try connected()
            setTimeout(context, timeout + extraWait)
            for command in commands { try append(command, to: context) }
            var replies: [RedisReply] = []
            replies.reserveCapacity(commands.count)
            for _ in commands {
                var raw: UnsafeMutableRawPointer?
                guard redisGetReply(context, &raw) == REDIS_OK, let raw else { throw lost(context) }
                let reply = raw.assumingMemoryBound(to: redisReply.self)
                replies.append(Self.copy(reply))
                freeReplyObject(raw)
            }
            return .success(replies)
        } catch let error as BrokerError {
            return .failure(error)
        } catch {
            return .failure(BrokerError(kind: .connection, message: "\(error)"))
        }
    }

    private func connected() throws -> UnsafeMutablePointer<redisContext> {
        if let context { return context }
        var tv = timeval(timeout)
        guard let context = redisConnectWithTimeout(address.host, Int32(address.port), tv) else {
            throw BrokerError(kind: .connection, message: "cannot connect to \(address): out of memory")
        }
        if context.pointee.err != 0 {
            let reason = Self.errorText(context)
            redisFree(context)
            throw BrokerError(kind: .connection, message: "cannot connect to \(address): \(reason)")
        }
        _ = redisEnableKeepAlive(context)
        tv = timeval(timeout)
        redisSetTimeout(context, tv)
        self.context = context
        var setup: [[String]] = []
        if let password = address.password { setup.append(["AUTH", password]) }
        if address.database != 0 { setup.append(["SELECT", String(address.database)]) }
        for command in setup {
            try append(command.map { Array($0.utf8) }, to: context)
            var raw: UnsafeMutableRawPointer?
            guard redisGetReply(context, &raw) == REDIS_OK, let raw else { throw lost(context) }
            let reply = Self.copy(raw.assumingMemoryBound(to: redisReply.self))
            freeReplyObject(raw)
            if case .error(let message) = reply {
                redisFree(context)
                self.context = nil
                throw BrokerError(kind: .connection, message: "\(address) refused \(command[0]): \(message)")
            }
        }
        return context
    }

    private func append(_ command: [[UInt8]], to context: UnsafeMutablePointer<redisContext>) throws {
        // hiredis copies the arguments into its output buffer, so the pointers need to live only
        // for this call.
        let lengths = command.map(\.count)
        let status: Int32 = command.withPointers { pointers in
            lengths.withUnsafeBufferPointer { redisAppendCommandArgv(context, Int32(command.count), pointers, $0.baseAddress) }
        }
        guard status == REDIS_OK else { throw lost(context) }
    }

    /// The link is unusable after a transport error: free it so the next call reconnects.
    private func lost(_ context: UnsafeMutablePointer<redisContext>) -> BrokerError {
        let reason = Self.errorText(context)
        redisFree(context)
        self.context = nil
        return BrokerError(kind: .connection, message: "lost the connection to \(address): \(reason)")
    }

    private func setTimeout(_ context: UnsafeMutablePointer<redisContext>, _ duration: Duration) {
        redisSetTimeout(context, timeval(duration))
    }

    private static func errorText(_ context: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: context.pointee.errstr) { raw in
            let bytes = raw.prefix { $0 != 0 }
            return bytes.isEmpty ? "error \(context.pointee.err)" : String(decoding: bytes, as: UTF8.self)
        }
    }

    private static func copy(_ reply: UnsafeMutablePointer<redisReply>) -> RedisReply {
        let r = reply.pointee
        func bytes() -> [UInt8] {
            guard let str = r.str, r.len > 0 else { return [] }
            return Array(UnsafeRawBufferPointer(start: str, count: r.len))
        }
        switch r.type {
        case REDIS_REPLY_STRING: return .string(bytes())
        case REDIS_REPLY_STATUS: return .status(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_ERROR: return .error(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_INTEGER: return .integer(Int(r.integer))
        case REDIS_REPLY_ARRAY:
            guard let element = r.element else { return .array([]) }
            return .array((0..<r.elements).map { element[$0].map(copy) ?? .null })
        default: return .null
        }
    }
}

private extension timeval {
    init(_ duration: Duration) {
        let micros = max(0, duration.inMicroseconds)
        self.init(tv_sec: Int(micros / 1_000_000), tv_usec: Int(micros % 1_000_000))
    }
}

private extension Duration {
    var inMicroseconds: Int64 { components.seconds * 1_000_000 + components.attoseconds / 1_000_000_000_000 }
}

private extension Array where Element == [UInt8] {
    /// Calls `body` with a C array of pointers to each element's bytes (all in one buffer), valid
    /// during the call.
    func withPointers<R>(_ body: (UnsafeMutablePointer<UnsafePointer<CChar>?>) -> R) -> R {
        var joined: [UInt8] = []
        joined.reserveCapacity(reduce(0) { $0 + $1.count } + 1)
        var offsets: [Int] = []
        offsets.reserveCapacity(count)
        for element in self {
            offsets.append(joined.count)
            joined.append(contentsOf: element)
        }
        joined.append(0)
        return joined.withUnsafeBytes { raw in
            let base = raw.baseAddress!.assumingMemoryBound(to: CChar.self)
            var pointers: [UnsafePointer<CChar>?] = offsets.map { base + $0 }
            return pointers.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
        }
    }
}
