import HTTPTypes
import NIOCore
import NIOHTTPTypes
import Sidecar

/// Refuses an inference request for an overloaded model on the connection's event loop, from its
/// head alone, before the request reaches the router.
///
/// Under an overload most requests are refused, and what a refusal costs decides how much CPU is
/// left to serve the others: through the router each one took a task, two hops between the event
/// loop and the cooperative pool and a place in the same queues as the accepted requests' answers,
/// which then waited behind thousands of refusals (`scripts/bench-overload.sh`). Here a refusal is
/// a look at the path, a look at the model's queue and three writes, all on the event loop; its
/// body, if it is sent, is read and dropped. The router's own check (``Model/refuseEarly()``, then
/// the batcher's decision with the items) stays for what passes here.
///
/// Only the inference routes are looked at (`/v2/models/M[/versions/V]/infer`,
/// `/v1/models/M:predict`); anything else, or a model it cannot resolve, goes on to the router,
/// which gives the proper answer. A request is refused here only when no earlier request of the
/// connection is still unanswered, so HTTP/1.1's order of responses holds for pipelining clients.
final class EarlyRefusalHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private let host: ModelHost
    private let metrics: FrontMetrics
    /// With API keys, only a request whose key may call the model is refused here; the rest go
    /// on to be told 401 or 403.
    private let gatekeeper: Gatekeeper?
    /// Requests passed on whose response has not ended yet.
    private var unanswered = 0
    /// The body of a request refused here is still arriving: drop it.
    private var dropping = false
    /// A refused request asked to close the connection: nothing more is read from it.
    private var closing = false

    init(host: ModelHost, metrics: FrontMetrics, gatekeeper: Gatekeeper? = nil) {
        self.host = host
        self.metrics = metrics
        self.gatekeeper = gatekeeper
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch part {
        case .head(let head):
            if closing { return }
            if unanswered == 0, let refusal = refusal(for: head, context: context) {
                dropping = true
                write(refusal.error, closing: head.headerFields[.connection]?.lowercased() == "close", context: context)
                metrics.record(model: refusal.model, protocol: refusal.protocol, since: refusal.start, error: refusal.error)
                return
            }
            unanswered += 1
        case .body:
            if dropping || closing { return }
        case .end:
            if closing { return }
            if dropping {
                dropping = false
                return
            }
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { unanswered = max(0, unanswered - 1) }
        context.write(data, promise: promise)
    }

    private struct Refusal {
        let model: String
        let `protocol`: String
        let error: FrontError
        let start: ContinuousClock.Instant
    }

    private func refusal(for head: HTTPRequest, context: ChannelHandlerContext) -> Refusal? {
        // A client that does not read its answers must meet the router's backpressure (one request
        // at a time, written as the socket takes it), not a refusal buffered for every head it sends.
        guard context.channel.isWritable else { return nil }
        guard head.method == .post, let path = head.path, let target = Self.inferenceTarget(path) else { return nil }
        // A request that waits for "100 Continue" is left to the router: answered here, the client
        // might hold its body back and the connection's framing would be lost.
        guard head.headerFields[.expect] == nil else { return nil }
        let start = ContinuousClock.now
        guard (try? host.resolve(target.model, version: target.version)) != nil else { return nil }
        if let gatekeeper, gatekeeper.requiresKeys {
            guard case let key?? = try? gatekeeper.authenticate(head.headerFields.value, counting: false), key.allows(target.model) else { return nil }
        }
        do {
            try host.refuseEarly(target.model, version: target.version)
            return nil
        } catch {
            return Refusal(model: target.model, protocol: target.protocol, error: FrontError.from(error), start: start)
        }
    }

    /// The model (and version) an inference path names, and the protocol's metric label; nil for
    /// any other path, or one with escapes (the router decodes those).
    static func inferenceTarget(_ path: String) -> (model: String, version: String?, protocol: String)? {
        let route = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        guard !route.contains("%") else { return nil }
        let parts = route.split(separator: "/", omittingEmptySubsequences: false)
        // "", "v2", "models", M, "infer"  or  "", "v2", "models", M, "versions", V, "infer"
        if parts.count == 5, parts[0].isEmpty, parts[1] == "v2", parts[2] == "models", parts[4] == "infer", !parts[3].isEmpty {
            return (String(parts[3]), nil, "http")
        }
        if parts.count == 7, parts[0].isEmpty, parts[1] == "v2", parts[2] == "models", parts[4] == "versions", parts[6] == "infer",
            !parts[3].isEmpty, !parts[5].isEmpty
        {
            return (String(parts[3]), String(parts[5]), "http")
        }
        if parts.count == 4, parts[0].isEmpty, parts[1] == "v1", parts[2] == "models", parts[3].hasSuffix(":predict") {
            let name = parts[3].dropLast(":predict".count)
            return name.isEmpty ? nil : (String(name), nil, "kserve_v1")
        }
        return nil
    }

    private func write(_ error: FrontError, closing: Bool, context: ChannelHandlerContext) {
        let body = error.jsonBody
        var fields = error.responseHeaders
        fields[.contentLength] = "\(body.count)"
        if closing { fields[.connection] = "close" }
        context.write(wrapOutboundOut(.head(HTTPResponse(status: error.status, headerFields: fields))), promise: nil)
        context.write(wrapOutboundOut(.body(context.channel.allocator.buffer(bytes: body))), promise: nil)
        if closing {
            // Half-close, as Hummingbird does: a full close with the body unread would reset the
            // connection, and the client could lose the answer while it is still sending.
            self.closing = true
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in bound.value.close(mode: .output, promise: nil) }
        } else {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}
