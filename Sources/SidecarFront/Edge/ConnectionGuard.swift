import HTTPTypes
import Metrics
import NIOCore
import NIOHTTPTypes
import Synchronization

/// The open connections of one listener (HTTP, gRPC or admin), capped at `limit`.
///
/// At the cap a new connection is let in only by closing the one that has been quiet the longest:
/// first among those with no request in progress (idle keep-alives), then any quiet for more than
/// a second (a client holding half a request). With none such, the new connection is closed: the
/// ones open are all at work. So an attacker's held connections are what makes room, not the
/// server's file descriptors.
final class ConnectionGate: Sendable {
    let listener: String
    let limit: Int
    private let open = Mutex<[ObjectIdentifier: ConnectionRecord]>([:])
    private let gauge: Gauge
    private let closed: [String: Counter]

    init(listener: String, limit: Int) {
        self.listener = listener
        self.limit = limit
        gauge = Gauge(label: "sidecar_connections", dimensions: [("listener", listener)])
        closed = Dictionary(uniqueKeysWithValues: ["evicted", "refused", "request_timeout", "idle_timeout"].map {
            ($0, Counter(label: "sidecar_connections_closed_total", dimensions: [("listener", listener), ("reason", $0)]))
        })
    }

    var count: Int { open.withLock { $0.count } }

    /// Lets `record` in, closing a quiet connection if at the cap; false: refused.
    func enter(_ record: ConnectionRecord) -> Bool {
        let now = NIODeadline.now().uptimeNanoseconds
        let (admitted, evicted, count): (Bool, ConnectionRecord?, Int) = open.withLock { open in
            var evicted: ConnectionRecord?
            if open.count >= limit {
                var quietest: (record: ConnectionRecord, idle: Bool, last: UInt64)?
                for candidate in open.values {
                    let idle = !candidate.busy.load(ordering: .relaxed)
                    let last = candidate.lastActivity.load(ordering: .relaxed)
                    if let best = quietest, (best.idle && !idle) || (best.idle == idle && best.last <= last) { continue }
                    quietest = (candidate, idle, last)
                }
                guard let quietest, quietest.idle || now &- quietest.last > 1_000_000_000 else { return (false, nil, open.count) }
                open.removeValue(forKey: ObjectIdentifier(quietest.record))
                evicted = quietest.record
            }
            open[ObjectIdentifier(record)] = record
            return (true, evicted, open.count)
        }
        gauge.record(count)
        if let evicted {
            closed["evicted"]?.increment()
            evicted.channel.close(promise: nil)
        }
        if !admitted { closed["refused"]?.increment() }
        return admitted
    }

    func leave(_ record: ConnectionRecord) {
        let count = open.withLock { open in
            open.removeValue(forKey: ObjectIdentifier(record))
            return open.count
        }
        gauge.record(count)
    }

    func count(closed reason: String) { closed[reason]?.increment() }
}

/// One open connection, as its gate sees it.
final class ConnectionRecord: Sendable {
    let channel: any Channel
    /// `NIODeadline` uptime of the last byte read or written.
    let lastActivity: Atomic<UInt64>
    /// A request is in progress (its bytes arriving, or its answer not yet written).
    let busy = Atomic<Bool>(false)

    init(channel: any Channel) {
        self.channel = channel
        lastActivity = Atomic(NIODeadline.now().uptimeNanoseconds)
    }

    func touch() { lastActivity.store(NIODeadline.now().uptimeNanoseconds, ordering: .relaxed) }
}

/// First in every accepted connection's pipeline (below TLS): it enters the connection at its
/// listener's gate, notes when bytes move, and for HTTP/1 enforces the two clocks of a slow or
/// idle client: a request must arrive in full within `requestTimeout` of its first byte (else 408
/// and close, answered by ``RequestClockHandler``), and a connection with no request in progress
/// is closed after `idleTimeout`. gRPC connections leave those to the transport (idle connections,
/// keepalive pings) and to the service (a message must arrive within the request timeout).
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Clocks {
        case http1(request: TimeAmount, idle: TimeAmount)
        /// gRPC: the transport closes idle connections with a GOAWAY and a PING, and waits for the
        /// ping's answer before it closes; a peer that never answers would hold the connection for
        /// ever. A live peer answers the transport's keepalive pings, so a connection that sent
        /// nothing for this long is closed here.
        case silence(TimeAmount)
    }

    private enum Phase { case idle, receiving, processing }

    private let gate: ConnectionGate
    private let clocks: Clocks
    private var record: ConnectionRecord?
    private var phase = Phase.idle
    private var timer: Scheduled<Void>?
    private var context: ChannelHandlerContext?
    private var lastRead = NIODeadline.now()
    /// Answers a request that timed out (408) before the connection closes: set by the HTTP handler.
    var onRequestTimeout: (() -> Void)?

    init(gate: ConnectionGate, clocks: Clocks) {
        self.gate = gate
        self.clocks = clocks
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let record = ConnectionRecord(channel: context.channel)
        guard gate.enter(record) else {
            context.close(promise: nil)
            return
        }
        self.record = record
        arm()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        if let record { gate.leave(record) }
        record = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        record?.touch()
        lastRead = .now()
        if phase == .idle, case .http1 = clocks {
            phase = .receiving
            record?.busy.store(true, ordering: .relaxed)
            arm()
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        record?.touch()
        context.write(data, promise: promise)
    }

    /// The request's last part arrived: its clock stops.
    func requestReceived() {
        guard phase == .receiving else { return }
        phase = .processing
        timer?.cancel()
        timer = nil
    }

    /// The response's last part was written: the connection is idle until the next byte.
    func responseSent() {
        phase = .idle
        record?.busy.store(false, ordering: .relaxed)
        arm()
    }

    private func arm() {
        timer?.cancel()
        timer = nil
        if case .silence(let limit) = clocks, let context {
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            timer = context.eventLoop.scheduleTask(deadline: lastRead + limit) { bound.value.silenceCheck(limit) }
            return
        }
        guard case .http1(let request, let idle) = clocks, let context, phase != .processing else { return }
        let limit = phase == .idle ? idle : request
        let expected = phase
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: limit) { bound.value.expired(expected) }
    }

    private func silenceCheck(_ limit: TimeAmount) {
        guard let context else { return }
        if NIODeadline.now() - lastRead >= limit {
            gate.count(closed: "idle_timeout")
            context.close(promise: nil)
        } else {
            arm()
        }
    }

    private func expired(_ expected: Phase) {
        guard phase == expected, let context else { return }
        if phase == .receiving {
            gate.count(closed: "request_timeout")
            if let onRequestTimeout { onRequestTimeout() } else { context.close(promise: nil) }
        } else {
            gate.count(closed: "idle_timeout")
            context.close(promise: nil)
        }
    }
}

/// Tells the connection's ``ConnectionGuard`` where its HTTP/1 requests begin and end (it sees
/// only bytes), and answers a request that did not arrive in time with 408.
final class RequestClockHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private var connectionGuard: ConnectionGuard?
    /// A response has begun (a late 408 would corrupt it).
    private var responding = false

    func handlerAdded(context: ChannelHandlerContext) {
        connectionGuard = try? context.pipeline.syncOperations.handler(type: ConnectionGuard.self)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        connectionGuard?.onRequestTimeout = { bound.value.0.timedOut(context: bound.value.1) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        connectionGuard?.onRequestTimeout = nil
        connectionGuard = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .end = unwrapInboundIn(data) { connectionGuard?.requestReceived() }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head: responding = true
        case .body: break
        case .end:
            responding = false
            connectionGuard?.responseSent()
        }
        context.write(data, promise: promise)
    }

    private func timedOut(context: ChannelHandlerContext) {
        guard !responding else {
            context.close(promise: nil)
            return
        }
        let body = Array(#"{"error":"the request did not arrive in full within limits.request_timeout_s; send it faster or raise the limit"}"#.utf8)
        var fields = HTTPFields()
        fields[.contentType] = "application/json"
        fields[.contentLength] = "\(body.count)"
        fields[.connection] = "close"
        context.write(wrapOutboundOut(.head(HTTPResponse(status: .requestTimeout, headerFields: fields))), promise: nil)
        context.write(wrapOutboundOut(.body(context.channel.allocator.buffer(bytes: body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }
}
