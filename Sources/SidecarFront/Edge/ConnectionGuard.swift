import HTTPTypes
import Metrics
import NIOCore
import NIOHTTP2
import NIOHTTPTypes
import Synchronization

/// The open connections of one listener (HTTP, gRPC or admin), capped at `limit`.
///
/// At the cap a new connection is let in only by closing one that is not at work: first the
/// quietest idle one (a keep-alive with no request in progress), then the quietest one that has
/// been receiving a request for over a second without a byte (a client holding half a request).
/// A connection whose request is being answered is never closed for another; with none to close,
/// the new connection is. So an attacker's held connections are what makes room, not the server's
/// file descriptors, and no caller's answer is cut off.
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

    /// Lets `record` in, closing a quiet connection if at the cap; false: refused.
    func enter(_ record: ConnectionRecord) -> Bool {
        let now = NIODeadline.now().uptimeNanoseconds
        let (admitted, evicted, count): (Bool, ConnectionRecord?, Int) = open.withLock { open in
            var evicted: ConnectionRecord?
            if open.count >= limit {
                var idle: (record: ConnectionRecord, last: UInt64)?
                var stalled: (record: ConnectionRecord, last: UInt64)?
                for candidate in open.values {
                    let last = candidate.lastActivity.load(ordering: .relaxed)
                    switch candidate.phase.load(ordering: .relaxed) {
                    case ConnectionRecord.idle:
                        if last < idle?.last ?? .max { idle = (candidate, last) }
                    case ConnectionRecord.receiving where now &- last > 1_000_000_000:
                        if last < stalled?.last ?? .max { stalled = (candidate, last) }
                    default:
                        continue
                    }
                }
                guard let quietest = idle ?? stalled else { return (false, nil, open.count) }
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
    static let idle: UInt8 = 0
    static let receiving: UInt8 = 1
    static let working: UInt8 = 2

    let channel: any Channel
    /// `NIODeadline` uptime of the last byte read or written.
    let lastActivity: Atomic<UInt64>
    /// ``idle``, ``receiving`` (a request is arriving) or ``working`` (requests are being answered).
    let phase = Atomic<UInt8>(ConnectionRecord.idle)

    init(channel: any Channel) {
        self.channel = channel
        lastActivity = Atomic(NIODeadline.now().uptimeNanoseconds)
    }

    func touch(_ now: NIODeadline = .now()) { lastActivity.store(now.uptimeNanoseconds, ordering: .relaxed) }
}

/// In every accepted connection's pipeline, just after TLS (so it sees what the client actually
/// sent, and a handshake that never ends is an idle connection): it enters the connection at its
/// listener's gate and keeps the clocks of a slow or idle client, with one repeating tick per
/// connection (no timer is set or cancelled per request).
///
/// - HTTP/1: a request must arrive in full within `request` of its first byte (else 408 when
///   nothing before it is still unanswered, and close), and a connection with no request arriving
///   or unanswered is closed after `idle`. ``RequestClockHandler`` tells it where requests and
///   responses begin and end; it counts them, so pipelined requests and answers given before a
///   request's body has all arrived (an early 401, 429 or 413) keep the clocks right.
/// - HTTP/2 (gRPC): every stream's ``StreamClock`` registers here; a ModelInfer request (or each
///   message of a stream) must arrive within `request`, and a connection that sent nothing for
///   `silence` is closed: the transport's own idle GOAWAY waits for a ping answer that a hostile
///   peer never sends, and a live peer answers the keepalive pings.
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Clocks {
        case http1(request: TimeAmount, idle: TimeAmount)
        case http2(request: TimeAmount, silence: TimeAmount)

        var tick: TimeAmount {
            let shortest: TimeAmount
            switch self {
            case .http1(let request, let idle): shortest = min(request, idle)
            case .http2(let request, let silence): shortest = min(request, silence)
            }
            // An eighth of the shortest limit: a clock is late by at most that.
            return max(.milliseconds(100), min(.seconds(5), .nanoseconds(shortest.nanoseconds / 8)))
        }
    }

    private let gate: ConnectionGate
    private let clocks: Clocks
    private var record: ConnectionRecord?
    private var context: ChannelHandlerContext?
    private var tick: RepeatedTask?
    private var lastRead = NIODeadline.now()
    private var closing = false

    // HTTP/1: counted by RequestClockHandler.
    private var headsRead = 0
    private var endsRead = 0
    private var responsesEnded = 0
    private var responding = false
    /// Bytes of a request whose head has not been decoded yet have arrived.
    private var headPending = false
    private var receivingSince: NIODeadline?
    private var idleSince = NIODeadline.now()
    /// Answers a request that timed out (408): set by the HTTP handler.
    var onRequestTimeout: (() -> Void)?

    // HTTP/2: the open streams' clocks.
    private var streams: [ObjectIdentifier: StreamClock] = [:]

    init(gate: ConnectionGate, clocks: Clocks) {
        self.gate = gate
        self.clocks = clocks
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        tick?.cancel()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let record = ConnectionRecord(channel: context.channel)
        guard gate.enter(record) else {
            context.close(promise: nil)
            return
        }
        self.record = record
        idleSince = .now()
        lastRead = .now()
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        tick = context.eventLoop.scheduleRepeatedTask(initialDelay: clocks.tick, delay: clocks.tick) { _ in bound.value.check() }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        tick?.cancel()
        tick = nil
        if let record { gate.leave(record) }
        record = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastRead = .now()
        record?.touch(lastRead)
        if case .http1 = clocks, !isReceiving {
            headPending = true
            receivingSince = lastRead
            publish()
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        record?.touch()
        context.write(data, promise: promise)
    }

    // MARK: HTTP/1 requests and responses

    private var isReceiving: Bool { headPending || headsRead > endsRead }

    func headRead() {
        headsRead += 1
        headPending = false
        if receivingSince == nil { receivingSince = .now() }
        publish()
    }

    func endRead() {
        endsRead += 1
        if !isReceiving { receivingSince = nil }
        publish()
    }

    func responseBegan() { responding = true }

    func responseEnded() {
        responding = false
        responsesEnded += 1
        publish()
    }

    /// Shows the gate what the connection is doing, and starts the idle clock when it goes idle.
    private func publish() {
        let phase: UInt8
        if isReceiving {
            phase = ConnectionRecord.receiving
        } else if responsesEnded < headsRead || !streams.isEmpty {
            phase = ConnectionRecord.working
        } else {
            phase = ConnectionRecord.idle
        }
        if phase == ConnectionRecord.idle, record?.phase.load(ordering: .relaxed) != ConnectionRecord.idle { idleSince = .now() }
        record?.phase.store(phase, ordering: .relaxed)
    }

    // MARK: HTTP/2 streams

    func streamOpened(_ clock: StreamClock) {
        streams[ObjectIdentifier(clock)] = clock
        publish()
    }

    func streamClosed(_ clock: StreamClock) {
        streams.removeValue(forKey: ObjectIdentifier(clock))
        publish()
    }

    // MARK: The tick

    private func check() {
        guard let context, !closing else { return }
        let now = NIODeadline.now()
        switch clocks {
        case .http1(let request, let idle):
            if isReceiving, let since = receivingSince, now - since >= request {
                gate.count(closed: "request_timeout")
                // A 408 only when it cannot be taken for the answer to an earlier request, nor be
                // a second answer to this one (answered early, at its head).
                let unanswered = headsRead - responsesEnded
                if !responding, let onRequestTimeout, unanswered == (headsRead > endsRead ? 1 : 0) {
                    onRequestTimeout()
                } else {
                    context.close(promise: nil)
                }
                close(context, after: .seconds(1))
            } else if !isReceiving, responsesEnded >= headsRead, now - idleSince >= idle {
                gate.count(closed: "idle_timeout")
                close(context, after: .zero)
            }
        case .http2(let request, let silence):
            if now - lastRead >= silence {
                gate.count(closed: "idle_timeout")
                close(context, after: .zero)
                return
            }
            for clock in streams.values where clock.overdue(now: now, limit: request) {
                clock.reset()
            }
        }
    }

    /// Closes now, or (after a 408 was written) once `delay` has passed whatever became of the write.
    private func close(_ context: ChannelHandlerContext, after delay: TimeAmount) {
        closing = true
        if delay == .zero {
            context.close(promise: nil)
        } else {
            let channel = context.channel
            context.eventLoop.scheduleTask(in: delay) { channel.close(promise: nil) }
        }
    }
}

/// Tells the connection's ``ConnectionGuard`` where its HTTP/1 requests and responses begin and
/// end (it sees only bytes), and writes the 408 for a request that did not arrive in time.
final class RequestClockHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private var connectionGuard: ConnectionGuard?

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
        switch unwrapInboundIn(data) {
        case .head: connectionGuard?.headRead()
        case .body: break
        case .end: connectionGuard?.endRead()
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let head) where head.status.kind != .informational: connectionGuard?.responseBegan()
        case .head, .body: break
        case .end: connectionGuard?.responseEnded()
        }
        context.write(data, promise: promise)
    }

    private func timedOut(context: ChannelHandlerContext) {
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

/// One gRPC stream's clock, first in the stream's pipeline: a unary request (HEADERS to
/// END_STREAM) must arrive within the request timeout, and so must each message of a streaming
/// call (ModelStreamInfer) from its first byte, so that a client cannot hold a stream with half a
/// message. Overdue streams are reset by the connection's tick.
final class StreamClock: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload

    private weak var connectionGuard: ConnectionGuard?
    private var context: ChannelHandlerContext?
    /// The whole request must arrive (unary), or only each message (a streaming call).
    private var streaming = false
    /// Since when something is awaited: the request's end (unary), or the current message's end.
    private var waitingSince: NIODeadline? = .now()
    /// Bytes of the current message still to come (after its 5-byte prefix), or of the prefix.
    private var prefix: [UInt8] = []
    private var remaining = 0

    init(connectionGuard: ConnectionGuard) {
        self.connectionGuard = connectionGuard
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        connectionGuard?.streamOpened(self)
    }

    /// Called for every stream, however it ended (a stream channel's pipeline is torn down on close).
    func handlerRemoved(context: ChannelHandlerContext) {
        connectionGuard?.streamClosed(self)
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let headers):
            if headers.headers.first(name: ":path")?.hasSuffix("/ModelStreamInfer") == true {
                streaming = true
                waitingSince = nil
            }
            if headers.endStream { waitingSince = nil }
        case .data(let frame):
            if streaming, case .byteBuffer(let buffer) = frame.data { follow(buffer) }
            if frame.endStream { waitingSince = nil }
        default:
            break
        }
        context.fireChannelRead(data)
    }

    /// Follows gRPC's length-prefixed messages through a streaming call's DATA.
    private func follow(_ buffer: ByteBuffer) {
        var buffer = buffer
        while buffer.readableBytes > 0 {
            if remaining > 0 {
                let taken = min(remaining, buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: taken)
                remaining -= taken
                if remaining == 0 { waitingSince = nil }
                continue
            }
            guard let byte = buffer.readInteger(as: UInt8.self) else { break }
            if prefix.isEmpty, waitingSince == nil { waitingSince = .now() }
            prefix.append(byte)
            if prefix.count == 5 {
                remaining = Int(prefix[1]) << 24 | Int(prefix[2]) << 16 | Int(prefix[3]) << 8 | Int(prefix[4])
                prefix.removeAll(keepingCapacity: true)
                if remaining == 0 { waitingSince = nil }
            }
        }
    }

    func overdue(now: NIODeadline, limit: TimeAmount) -> Bool {
        guard let waitingSince else { return false }
        return now - waitingSince >= limit
    }

    /// RST_STREAM: the call ends for the client, the handler sees its request stream fail.
    func reset() {
        waitingSince = nil
        context?.close(promise: nil)
    }
}
