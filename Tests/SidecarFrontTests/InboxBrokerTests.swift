import Foundation
import Testing
import Yams
@testable import Sidecar
@testable import SidecarFront

/// A real redis-server on a free loopback port, in a directory of its own.
final class RedisServerFixture: @unchecked Sendable {
    let port: Int
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-redis-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        port = Int.random(in: 20_000...40_000)
        try start()
    }

    /// Spawned with posix_spawn and reaped with waitpid: Foundation's `Process.waitUntilExit` can
    /// spin on Linux when called off the main thread.
    private var pid: pid_t = 0

    func start() throws {
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let binary else {
            Issue.record("redis-server is not installed: run scripts/install-broker-tools.sh")
            throw CancellationError()
        }
        let arguments = [binary, "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", directory.path, "--logfile", directory.appendingPathComponent("redis.log").path]
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // The test's threads block signals, and a spawned child inherits the mask: reset it, or
        // redis-server would never see SIGTERM.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var child: pid_t = 0
        guard posix_spawn(&child, binary, nil, &attributes, &argv, environ) == 0 else {
            Issue.record("cannot start \(binary)")
            throw CancellationError()
        }
        pid = child
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while ContinuousClock.now < deadline {
            if connectProbe() { return }
            Thread.sleep(forTimeInterval: 0.05)
        }
        Issue.record("redis-server did not start on port \(port)")
    }

    private func connectProbe() -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        // Listening is not ready: a restarted server answers -LOADING while it reads its
        // append-only file. Ready is +PONG.
        guard connected, write(fd, "PING\r\n", 6) == 6 else { return false }
        var reply = [UInt8](repeating: 0, count: 64)
        let count = read(fd, &reply, reply.count)
        return count >= 5 && reply[0..<5] == Array("+PONG".utf8)[...]
    }

    func stop() {
        guard pid > 0 else { return }
        kill(pid, SIGTERM)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        pid = 0
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: directory)
    }

    var address: RedisAddress { RedisAddress(host: "127.0.0.1", port: port, password: nil, database: 0) }

    func broker(_ consumer: String, stream: String = "in") -> RedisStreamsBroker {
        RedisStreamsBroker(address: address, stream: stream, group: "g", consumer: consumer, outbox: "out", deadLetters: "dead")
    }
}

@Suite(.serialized) struct InboxBrokerTests {
    private func add(_ redis: RedisServerFixture, _ count: Int, stream: String = "in") async throws {
        let connection = RedisConnection(address: redis.address, name: "test")
        for index in 0..<count {
            _ = try await connection.command(["XADD", stream, "*", "id", "r\(index)", "item", "[\(index)]"])
        }
    }

    private func length(_ redis: RedisServerFixture, _ stream: String) async throws -> Int {
        try await RedisConnection(address: redis.address, name: "test").command(["XLEN", stream]).int ?? -1
    }

    private func result(_ message: InboxMessage) -> InboxOutcome {
        InboxOutcome(entry: message.entry, result: [("id", message.fields["id"] ?? []), ("prediction", message.fields["item"] ?? [])])
    }

    @Test func aMessageClaimedByAnotherConsumerGetsOneResult() async throws {
        let redis = try RedisServerFixture()
        defer { redis.stop() }
        let a = redis.broker("a")
        let b = redis.broker("b")
        try await a.prepare()
        try await b.prepare()  // the group exists: BUSYGROUP is not an error
        try await add(redis, 3)
        let read = try await a.readNew(max: 10, wait: .milliseconds(100))
        #expect(read.map { String(decoding: $0.fields["id"]!, as: UTF8.self) } == ["r0", "r1", "r2"])
        #expect(read.allSatisfy { $0.deliveries == 1 })
        // b takes the first over (as after a's stall), so a's late answer for it must not publish.
        let pending = try await b.pending(mine: false, after: nil, minIdle: .zero, max: 10)
        #expect(pending.map(\.consumer) == ["a", "a", "a"])
        let claimed = try await b.claim([pending[0]], minIdle: .zero)
        #expect(claimed.map(\.entry) == [read[0].entry])
        #expect(claimed[0].deliveries == 2)
        #expect(try await a.publish(read.map(result), lane: 0) == [false, true, true])
        #expect(try await b.publish(claimed.map(result), lane: 1) == [true])
        #expect(try await length(redis, "out") == 3)
        #expect(try await a.backlog().pending == 0)
        #expect(try await a.backlog().lag == 0)
        // Published twice (a retry after a lost reply): still one result.
        #expect(try await a.publish(read.map(result), lane: 0) == [false, false, false])
        #expect(try await length(redis, "out") == 3)
    }

    @Test func keptAliveMessagesAreNotClaimedAndOwnPendingComesBack() async throws {
        let redis = try RedisServerFixture()
        defer { redis.stop() }
        let a = redis.broker("a")
        let b = redis.broker("b")
        try await a.prepare()
        try await add(redis, 2)
        let read = try await a.readNew(max: 10, wait: .milliseconds(100))
        try await Task.sleep(for: .milliseconds(300))
        try await a.keepAlive([read[0].entry])
        let idle = try await b.pending(mine: false, after: nil, minIdle: .milliseconds(250), max: 10)
        #expect(idle.map(\.entry) == [read[1].entry])
        // b may not keep a's message alive for itself.
        try await b.keepAlive([read[1].entry])
        #expect(try await a.pending(mine: true, after: nil, minIdle: .zero, max: 10).map(\.entry) == read.map(\.entry))
        // Paging forward through one's own pending list (the restart pass) starts after the cursor.
        #expect(try await a.pending(mine: true, after: read[0].entry, minIdle: .zero, max: 10).map(\.entry) == [read[1].entry])
        #expect(try await b.pending(mine: true, after: nil, minIdle: .zero, max: 10).isEmpty)
    }

    @Test func deadLettersCarryTheReasonAndTheBrokerRestartIsSurvived() async throws {
        let redis = try RedisServerFixture()
        defer { redis.stop() }
        let a = redis.broker("a")
        try await a.prepare()
        try await add(redis, 1)
        let message = try await a.readNew(max: 10, wait: .milliseconds(100))[0]
        // A restart forgets the loaded scripts (NOSCRIPT) and drops the connections.
        redis.stop()
        await #expect(throws: BrokerError.self) { _ = try await a.backlog() }
        try redis.start()
        let outcome = InboxOutcome(
            entry: message.entry, result: [("id", Array("r0".utf8)), ("status", Array("error".utf8))],
            deadLetter: [("id", Array("r0".utf8)), ("reason", Array("it raised".utf8)), ("deliveries", Array("1".utf8))])
        #expect(try await a.publish([outcome], lane: 1) == [true])
        let dead = try await RedisConnection(address: redis.address, name: "test").command(["XRANGE", "dead", "-", "+"])
        let fields = dead.elements?.first?.elements?[1].elements?.compactMap(\.text)
        #expect(fields == ["id", "r0", "reason", "it raised", "deliveries", "1"])
        #expect(try await length(redis, "out") == 1)
        #expect(try await a.backlog().pending == 0)
    }

    @Test func addressesAndSettingsAreCheckedWithTheKeyNamed() throws {
        #expect(try RedisAddress.parse("redis://:secret@10.0.0.2:6380/2").get() == RedisAddress(host: "10.0.0.2", port: 6380, password: "secret", database: 2))
        #expect(try RedisAddress.parse("redis://localhost").get().port == 6379)
        #expect(try RedisAddress.parse("redis://:pw@h").get().description == "redis://h:6379")
        for bad in ["http://h", "redis://", "redis://h:0", "redis://h/x"] {
            #expect(throws: SidecarError.self, "\(bad)") { try RedisAddress.parse(bad).get() }
        }
        let good = try ServerConfigurationFile.read(yaml: "inboxes: {echo: {broker: 'redis://h:1', stream: in, outbox: out, max_deliveries: 2}}", path: "s.yaml")
        #expect(good.inboxes["echo"]?.maxDeliveries == 2)
        #expect(good.inboxes["echo"]?.deadLetterStream == "in-dead")
        #expect(good.inboxes["echo"]?.claimIdle(batchTimeout: .seconds(300)) == .seconds(30))
        #expect(good.inboxes["echo"]?.maxInFlight(maxQueue: 64) == 64)
        for (yaml, named) in [
            ("inboxes: {echo: {broker: 'redis://h', stream: in}}", "'inboxes.echo.outbox' is required"),
            ("inboxes: {echo: {broker: 'kafka://h', stream: in, outbox: out}}", "'inboxes.echo.broker'"),
            ("inboxes: {echo: {broker: 'redis://h', stream: in, outbox: in}}", "must differ"),
            ("inboxes: {echo: {broker: 'redis://h', stream: in, outbox: out, max_in_flight: 0}}", "'inboxes.echo.max_in_flight'"),
            ("inboxes: {echo: {broker: 'redis://h', stream: in, outbox: out, typo: 1}}", "unknown key 'inboxes.echo.typo'"),
        ] {
            let error = #expect(throws: SidecarError.self) { try ServerConfigurationFile.read(yaml: yaml, path: "s.yaml") }
            #expect(error?.message.contains(named) == true, "\(error?.message ?? "")")
        }
        let model = try ModelConfiguration.parse(yaml: "inbox: {broker: 'redis://h', stream: s, outbox: o, consumer: n1}", file: "sidecar.yaml", defaultName: "m")
        #expect(model.inbox?.consumerName == "n1")
    }

    @Test func outcomesAreTakenAllAtOnceAndTheQueueEnds() async {
        let queue = OutcomeQueue()
        let item = (InboxOutcome(entry: "1-0", result: []), ContinuousClock.now)
        queue.push([item, item])
        queue.push([item])
        #expect(await queue.next()?.count == 3)
        async let waiting = queue.next()
        try? await Task.sleep(for: .milliseconds(50))
        queue.push([item])
        #expect(await waiting?.count == 1)
        queue.finish()
        #expect(await queue.next() == nil)
    }
}
