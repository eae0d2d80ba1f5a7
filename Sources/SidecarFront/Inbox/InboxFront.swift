import DequeModule
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Sidecar
import Synchronization

/// One model's inbox, Jet's pipelined design: messages read from a broker's stream go through the
/// model's batcher like any other request, and each result goes to the outbox.
///
/// At-least-once delivery, one result per message: a message is acknowledged only in the same
/// atomic step that publishes its result (``InboxBroker/publish(_:)``), so a crash before that step
/// leaves it pending (re-read at restart, or claimed by another node) and a crash after it leaves
/// nothing to redo. What a message costs the node is bounded: at most `max_in_flight` read and not
/// yet answered, and never more than the model's queue has room for (credit), so a slow model
/// leaves the backlog in the broker, not in memory.
///
/// What is not the message's fault (the model stopping, its queue full, a deadline) leaves it
/// pending: it is claimed again once idle, a delivery more. What is (its item raised alone after
/// isolation, it killed workers past `max_retries`, it is malformed, or it was delivered more than
/// `max_deliveries` times) is set aside in the dead-letter stream with the reason, and its caller
/// gets an error result.
final class InboxFront: Sendable {
    let model: String
    let settings: InboxConfiguration
    let broker: any InboxBroker
    private let host: ModelHost
    private let logger: Logger
    private let state = Mutex(State())
    private let wakeups: AsyncStream<Void>
    private let wake: AsyncStream<Void>.Continuation
    private let outcomes = OutcomeQueue()
    private let labels: [(String, String)]
    /// Made once: a swift-metrics handle made per message costs a registry lookup each time.
    private let readToPublish: Metrics.Timer

    private struct State {
        /// Messages read and not yet published or released, with when they were read.
        var inFlight: [String: ContinuousClock.Instant] = [:]
        var stopping = false
        var publishersDone = 0
        var connected = false
        var lastError: String?
        var read = 0
        var published = 0
        var deadLettered = 0
        var redelivered = 0
        var released = 0
        /// Messages read whose items are not in the model's queue yet: they hold room in it, so a
        /// read does not count on space that an earlier read is about to take (and then find the
        /// queue full, giving its messages back while they stay pending).
        var unqueued = 0
        var lag: Int?
        var pending = 0
    }

    init(model: String, settings: InboxConfiguration, broker: any InboxBroker, host: ModelHost, logger: Logger) {
        self.model = model
        self.settings = settings
        self.broker = broker
        self.host = host
        var logger = logger
        logger[metadataKey: "inbox"] = "\(model)"
        self.logger = logger
        (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        labels = [("model", model), ("stream", settings.stream)]
        readToPublish = Metrics.Timer(label: "sidecar_inbox_read_to_publish_seconds", dimensions: labels)
    }

    /// Reads until a graceful shutdown, then finishes and publishes what it read before it returns.
    func run() async {
        logger.info("inbox: reading \(broker.description) for model '\(model)', results to '\(settings.outbox)'")
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for lane in 0..<self.broker.publishLanes {
                    group.addTask { await self.publishLoop(lane: lane) }
                }
                group.addTask { await self.housekeeping() }
                await self.readLoop()
                self.outcomes.finish()
            }
        } onGracefulShutdown: {
            self.stop()
        }
        await broker.close()
        let counts = state.withLock { ($0.read, $0.published, $0.released) }
        logger.info("inbox: stopped; read \(counts.0), published \(counts.1), left pending \(counts.2 + inFlightCount)")
    }

    func stop() {
        state.withLock { $0.stopping = true }
        wake.yield()
    }

    private var stopping: Bool { state.withLock { $0.stopping } || Task.isCancelled }
    private var inFlightCount: Int { state.withLock { $0.inFlight.count } }

    // MARK: - Reading

    private func readLoop() async {
        var wakeup = wakeups.makeAsyncIterator()
        await withDiscardingTaskGroup { work in
            var ownPendingFirst = true
            /// The last own pending entry looked at in this pass (nil: the pass has not started).
            var ownPendingCursor: String?
            var lastClaim = ContinuousClock.now
            var backoff = Backoff()
            while !stopping {
                guard let target = try? host.resolve(model), target.isReady else {
                    // Not loaded yet, reloading, or FAILED: the messages wait in the broker.
                    try? await Task.sleep(for: .milliseconds(200))
                    continue
                }
                let batching = target.configuration.batching
                let maxInFlight = settings.maxInFlight(maxQueue: batching.maxQueue)
                let (inFlight, unqueued) = state.withLock { ($0.inFlight.count, $0.unqueued) }
                // A read takes at most a quarter of the room, so several groups are in the model at
                // once (every worker busy) while earlier ones are being published.
                let room = min(maxInFlight - inFlight, batching.maxQueue - target.queuedItems - unqueued, max(1, maxInFlight / 4))
                if room <= 0 {
                    if inFlight >= maxInFlight {
                        _ = await wakeup.next()  // a result was published, or a stop
                    } else {
                        try? await Task.sleep(for: .milliseconds(5))  // the queue is full of other callers' items
                    }
                    continue
                }
                let claimIdle = settings.claimIdle(batchTimeout: target.configuration.timeouts.batch)
                do {
                    let messages: [InboxMessage]
                    if ownPendingFirst {
                        // After a start or a lost connection: the group may be new, and what this
                        // consumer read before (under its name) comes first.
                        // One pass, forward through the pending list: a message given back meanwhile
                        // (the queue filled) is not taken again at once, which would count a
                        // delivery each time until it looked like poison.
                        if ownPendingCursor == nil { try await broker.prepare() }
                        let (claimed, last) = try await claimOwnPending(after: ownPendingCursor, room: room)
                        messages = claimed
                        ownPendingCursor = last
                        if last == nil {
                            ownPendingFirst = false
                        }
                    } else if ContinuousClock.now - lastClaim >= claimIdle / 2 {
                        lastClaim = .now
                        messages = try await claimPending(mine: false, minIdle: claimIdle, room: room)
                    } else {
                        messages = try await broker.readNew(max: room, wait: .seconds(1))
                    }
                    if !backoff.isReset { logger.info("inbox: connected again to \(broker.description)") }
                    backoff.reset()
                    state.withLock { $0.connected = true }
                    guard !messages.isEmpty else { continue }
                    let admitted = admit(messages)
                    work.addTask { await self.process(admitted, at: .now) }
                } catch {
                    let first = backoff.isReset
                    let delay = backoff.next()
                    state.withLock {
                        $0.connected = false
                        $0.lastError = "\(error)"
                    }
                    if first { logger.warning("inbox: \(error); retrying") }
                    ownPendingFirst = true
                    ownPendingCursor = nil
                    try? await Task.sleep(for: delay)
                }
            }
        }
    }

    /// A page of this consumer's own pending messages after `after`, taken over; the last entry
    /// looked at (nil when there were none left).
    private func claimOwnPending(after: String?, room: Int) async throws -> ([InboxMessage], String?) {
        let busy = state.withLock { $0.inFlight }
        let page = try await broker.pending(mine: true, after: after, minIdle: .zero, max: room)
        guard let last = page.last?.entry else { return ([], nil) }
        let claimed = try await broker.claim(page.filter { busy[$0.entry] == nil }, minIdle: .zero)
        if !claimed.isEmpty { logger.info("inbox: took over \(claimed.count) message(s) this consumer read before") }
        return (claimed, last)
    }

    /// Pending messages to take over: anyone's left idle.
    /// Messages this node is working on are not taken again.
    private func claimPending(mine: Bool, minIdle: Duration, room: Int) async throws -> [InboxMessage] {
        let busy = state.withLock { $0.inFlight }
        let entries = try await broker.pending(mine: mine, after: nil, minIdle: minIdle, max: room + busy.count)
            .filter { busy[$0.entry] == nil }
            .prefix(room)
        guard !entries.isEmpty else { return [] }
        let claimed = try await broker.claim(Array(entries), minIdle: minIdle)
        if !claimed.isEmpty {
            let others = Set(entries.filter { $0.consumer != (settings.consumerName) }.map(\.entry))
            logger.info("inbox: took over \(claimed.count) pending message(s)\(others.isEmpty ? "" : ", \(others.count) left idle by other consumers")")
        }
        return claimed
    }

    /// Registers messages as in flight (before anything else can publish or keep them alive).
    private func admit(_ messages: [InboxMessage]) -> [InboxMessage] {
        let now = ContinuousClock.now
        let redelivered = messages.count { $0.deliveries > 1 }
        state.withLock { state in
            for message in messages { state.inFlight[message.entry] = now }
            state.unqueued += messages.count
            state.read += messages.count
            state.redelivered += redelivered
        }
        Counter(label: "sidecar_inbox_read_total", dimensions: labels).increment(by: messages.count)
        if redelivered > 0 { Counter(label: "sidecar_inbox_redelivered_total", dimensions: labels).increment(by: redelivered) }
        return messages
    }

    // MARK: - Serving

    /// What becomes of one message: its outcome is published, or it is given back unanswered.
    private enum Decision {
        case publish(InboxOutcome)
        case release(String)
    }

    private func process(_ messages: [InboxMessage], at readAt: ContinuousClock.Instant) async {
        var items: [(message: InboxMessage, id: String, item: JSONValue)] = []
        var itemTargets: [ObjectIdentifier: Model] = [:]
        var itemsByTarget: [ObjectIdentifier: [Int]] = [:]
        var decisions: [Decision] = []
        await withTaskGroup(of: [Decision].self) { calls in
            for message in messages {
                let id = InboxMessageCodec.requestID(message)
                guard let target = try? host.resolve(model, routingKey: id) else {
                    queued(1)
                    decisions.append(.release(message.entry))
                    continue
                }
                if message.deliveries > settings.maxDeliveries {
                    let reason = "delivered \(message.deliveries) times, more than max_deliveries (\(settings.maxDeliveries)): it may crash or hang the server"
                    queued(1)
                    decisions.append(.publish(setAside(message, id: id, reason: reason, version: target.servedVersion, kind: "maxDeliveries")))
                    continue
                }
                switch InboxMessageCodec.work(message) as InboxWork {
                case .item(let item):
                    let key = ObjectIdentifier(target)
                    itemTargets[key] = target
                    itemsByTarget[key, default: []].append(items.count)
                    items.append((message, id, item))
                case .request(let request):
                    calls.addTask { [await self.infer(request, message: message, id: id, on: target)] }
                case .setAside(let reason):
                    queued(1)
                    decisions.append(.publish(setAside(message, id: id, reason: reason, version: target.servedVersion, kind: "invalidInput")))
                }
            }
            // JSON items: one call per model version, so they enter its queue as one chunk.
            for (key, indices) in itemsByTarget {
                let target = itemTargets[key]!
                let batch = indices.map { items[$0] }
                calls.addTask { await self.predict(batch, on: target) }
            }
            for await some in calls { decisions += some }
        }
        var results: [OutcomeQueue.Item] = []
        var released: [String] = []
        for decision in decisions {
            switch decision {
            case .publish(let outcome): results.append((outcome, readAt))
            case .release(let entry): released.append(entry)
            }
        }
        if !released.isEmpty { release(released) }
        outcomes.push(results)
    }

    private func predict(_ batch: [(message: InboxMessage, id: String, item: JSONValue)], on target: Model) async -> [Decision] {
        let results: [ItemResult]
        let items = batch.map(\.item)
        queued(batch.count)  // their place in the queue is taken next, by this call
        do {
            results = try await target.submitPredictions(items)
        } catch {
            // The model could not take them (stopping, queue full, a deadline): not their fault.
            return batch.map { .release($0.message.entry) }
        }
        return zip(batch, results).map { entry, result in
            switch result {
            case .success(let prediction):
                return .publish(ok(entry.message, id: entry.id, target: target, field: "prediction", value: Array(prediction.data)))
            case .failure(let error) where error.kind == .unavailable:
                return .release(entry.message.entry)
            case .failure(let error):
                return .publish(setAside(entry.message, id: entry.id, reason: "\(error)", version: target.servedVersion, kind: error.kind.description))
            }
        }
    }

    private func infer(_ request: HTTPInference.Decoded, message: InboxMessage, id: String, on target: Model) async -> Decision {
        queued(1)
        do {
            try target.validate(request.inputs)
            let outputs = try await target.submitInference(request.inputs)
            let body = try HTTPInference.encode(outputs, for: request, model: target.name, version: target.servedVersion).body
            return .publish(ok(message, id: id, target: target, field: "response", value: Array(body)))
        } catch let error as PredictionError where error.kind != .unavailable {
            return .publish(setAside(message, id: id, reason: "\(error)", version: target.servedVersion, kind: error.kind.description))
        } catch let error as SidecarError where error.code == .invalidInput {
            return .publish(setAside(message, id: id, reason: error.message, version: target.servedVersion, kind: "invalidInput"))
        } catch let error as FrontError {
            return .publish(setAside(message, id: id, reason: error.message, version: target.servedVersion, kind: "invalidInput"))
        } catch {
            return .release(message.entry)
        }
    }

    private func ok(_ message: InboxMessage, id: String, target: Model, field: String, value: [UInt8]) -> InboxOutcome {
        InboxOutcome(entry: message.entry, result: InboxMessageCodec.result(id: id, entry: message.entry, model: model, version: target.servedVersion, status: "ok") + [(field, value)])
    }

    private func setAside(_ message: InboxMessage, id: String, reason: String, version: String?, kind: String = "setAside") -> InboxOutcome {
        var result = InboxMessageCodec.result(id: id, entry: message.entry, model: model, version: version, status: "error")
        result += [("error", Array(reason.utf8)), ("error_kind", Array(kind.utf8))]
        var dead: [(String, [UInt8])] = [
            ("id", Array(id.utf8)), ("inbox_id", Array(message.entry.utf8)), ("model", Array(model.utf8)),
            ("reason", Array(reason.utf8)), ("deliveries", Array(String(message.deliveries).utf8)),
        ]
        for field in InboxMessageCodec.payloadFields { if let value = message.fields[field] { dead.append((field, value)) } }
        return InboxOutcome(entry: message.entry, result: result, deadLetter: dead)
    }

    /// `count` messages no longer hold room in the model's queue: they are about to enter it, or
    /// never will.
    private func queued(_ count: Int) {
        state.withLock { $0.unqueued -= count }
    }

    /// Messages given back without a result: they stay pending and are claimed again once idle.
    private func release(_ entries: [String]) {
        state.withLock { state in
            for entry in entries { state.inFlight[entry] = nil }
            state.released += entries.count
        }
        wake.yield()
    }

    // MARK: - Publishing

    private func publishLoop(lane: Int) async {
        while let batch = await outcomes.next() {
            var backoff = Backoff()
            let giveUpAt = ContinuousClock.now.advanced(by: .seconds(30))
            var published: [Bool]?
            while published == nil {
                do {
                    published = try await broker.publish(batch.map(\.outcome), lane: lane)
                } catch {
                    state.withLock {
                        $0.connected = false
                        $0.lastError = "\(error)"
                    }
                    // Unpublished results are not lost: their messages stay pending and are served
                    // again. Past a shutdown, give up after a while rather than hang the exit.
                    if Task.isCancelled || (stopping && ContinuousClock.now >= giveUpAt) { break }
                    if backoff.isReset { logger.warning("inbox: \(error); retrying the publish") }
                    try? await Task.sleep(for: backoff.next())
                }
            }
            let now = ContinuousClock.now
            let outcome = published ?? Array(repeating: false, count: batch.count)
            var done = 0
            var dead = 0
            for (index, item) in batch.enumerated() where outcome[index] {
                done += 1
                if item.outcome.deadLetter != nil { dead += 1 }
                readToPublish.recordNanoseconds((now - item.readAt).inNanoseconds)
            }
            state.withLock { state in
                for item in batch { state.inFlight[item.outcome.entry] = nil }
                state.published += done
                state.deadLettered += dead
                state.released += batch.count - done
            }
            Counter(label: "sidecar_inbox_published_total", dimensions: labels).increment(by: done)
            if dead > 0 { Counter(label: "sidecar_inbox_dead_lettered_total", dimensions: labels).increment(by: dead) }
            wake.yield()
        }
        state.withLock { $0.publishersDone += 1 }
    }

    /// Keeps this node's messages fresh and reads the backlog, until the front is done.
    private func housekeeping() async {
        var lastKeepAlive = ContinuousClock.now
        var lastBacklog = ContinuousClock.now - .seconds(10)
        let lanes = broker.publishLanes
        while state.withLock({ $0.publishersDone < lanes }), !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(250))
            let batchTimeout = (try? host.resolve(model))?.configuration.timeouts.batch ?? .seconds(300)
            if ContinuousClock.now - lastKeepAlive >= settings.claimIdle(batchTimeout: batchTimeout) / 3 {
                lastKeepAlive = .now
                let entries = state.withLock { Array($0.inFlight.keys) }
                for start in stride(from: 0, to: entries.count, by: 1000) {
                    try? await broker.keepAlive(Array(entries[start..<min(entries.count, start + 1000)]))
                }
            }
            if ContinuousClock.now - lastBacklog >= .seconds(2) {
                lastBacklog = .now
                if let backlog = try? await broker.backlog() {
                    state.withLock {
                        $0.lag = backlog.lag
                        $0.pending = backlog.pending
                    }
                    if let lag = backlog.lag { Gauge(label: "sidecar_inbox_lag", dimensions: labels).record(lag) }
                    Gauge(label: "sidecar_inbox_pending", dimensions: labels).record(backlog.pending)
                }
            }
        }
    }

    // MARK: - Status

    var status: InboxStatus {
        state.withLock { state in
            InboxStatus(
                model: model, broker: broker.description, stream: settings.stream, group: settings.group, consumer: settings.consumerName,
                outbox: settings.outbox, deadLetter: settings.deadLetterStream, connected: state.connected, inFlight: state.inFlight.count,
                read: state.read, published: state.published, deadLettered: state.deadLettered, redelivered: state.redelivered,
                lag: state.lag, pending: state.pending, lastError: state.lastError)
        }
    }
}

/// An inbox as `/status` shows it.
struct InboxStatus: Encodable, Sendable {
    var model: String
    var broker: String
    var stream: String
    var group: String
    var consumer: String
    var outbox: String
    var deadLetter: String
    var connected: Bool
    var inFlight: Int
    var read: Int
    var published: Int
    var deadLettered: Int
    var redelivered: Int
    @ExplicitNull var lag: Int?
    var pending: Int
    @ExplicitNull var lastError: String?

    enum CodingKeys: String, CodingKey {
        case model, broker, stream, group, consumer, outbox, deadLetter = "dead_letter", connected, inFlight = "in_flight", read, published
        case deadLettered = "dead_lettered", redelivered, lag, pending, lastError = "last_error"
    }
}

/// Results waiting to be published, handed from the serving tasks to the publishers, each of which
/// takes everything queued at once (one pipeline to the broker).
final class OutcomeQueue: Sendable {
    typealias Item = (outcome: InboxOutcome, readAt: ContinuousClock.Instant)
    private struct State {
        var items: Deque<Item> = []
        var waiters: Deque<CheckedContinuation<[Item]?, Never>> = []
        var finished = false
    }
    private let state = Mutex(State())

    func push(_ items: [Item]) {
        guard !items.isEmpty else { return }
        let handOff: (CheckedContinuation<[Item]?, Never>, [Item])? = state.withLock { state in
            guard let waiter = state.waiters.popFirst() else {
                state.items.append(contentsOf: items)
                return nil
            }
            return (waiter, items)
        }
        if let (waiter, items) = handOff { waiter.resume(returning: items) }
    }

    /// Everything queued, waiting for some; nil once finished and empty.
    func next() async -> [Item]? {
        await withCheckedContinuation { continuation in
            let ready: [Item]?? = state.withLock { state in
                if !state.items.isEmpty {
                    let all = Array(state.items)
                    state.items.removeAll()
                    return .some(all)
                }
                if state.finished { return .some(nil) }
                state.waiters.append(continuation)
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    func finish() {
        let waiters: Deque<CheckedContinuation<[Item]?, Never>> = state.withLock { state in
            state.finished = true
            defer { state.waiters.removeAll() }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: nil) }
    }
}

/// Exponential backoff from 100 ms to 5 s.
struct Backoff {
    private var current: Duration?
    var isReset: Bool { current == nil }
    mutating func reset() { current = nil }
    mutating func next() -> Duration {
        let delay = current.map { min($0 * 2, .seconds(5)) } ?? .milliseconds(100)
        current = delay
        return delay
    }
}
