#if canImport(Glibc)
import Glibc
#else
import Darwin
#endif
import GRPCCore
import GRPCNIOTransportHTTP2
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Sidecar
import UnixSignals

/// The edge of one server: its TLS credentials, API keys and rate limits, and a connection gate
/// per listener. Every listener's accepted connections start with its ``ConnectionGuard`` and, with
/// TLS, an SSL handler made from the current credentials.
final class Edge: Sendable {
    let configuration: EdgeConfiguration
    let credentials: TLSCredentials?
    let gatekeeper: Gatekeeper

    init(_ configuration: EdgeConfiguration, logger: Logger) throws {
        var configuration = configuration
        configuration.maxConnections = Self.fitDescriptors(configuration.maxConnections, logger: logger)
        self.configuration = configuration
        credentials = try configuration.tls.map(TLSCredentials.init)
        gatekeeper = try Gatekeeper(configuration: configuration)
    }

    /// Raises the soft limit of open files to the hard one, and lowers `max_connections` so that
    /// three listeners at their cap still leave descriptors for workers, sockets and files: past
    /// the process's limit, accepting fails before the gate could close anything.
    static func fitDescriptors(_ maxConnections: Int, logger: Logger) -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return maxConnections }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        let budget = max(16, (Int(clamping: limit.rlim_cur) - 512) / 3)
        guard maxConnections > budget else { return maxConnections }
        logger.warning("limits.max_connections \(maxConnections) per listener is more than the \(limit.rlim_cur) open files this process may have allow for three listeners; using \(budget) (raise the limit: ulimit -n, or LimitNOFILE= in systemd)")
        return budget
    }

    static func timeAmount(_ duration: Duration) -> TimeAmount { .nanoseconds(Int64(min(duration.inSeconds, 1e9) * 1e9)) }

    /// How long a keepalive ping may go unanswered.
    private var keepaliveTimeout: Duration { min(.seconds(20), configuration.idleTimeout) }

    func gate(_ listener: String) -> ConnectionGate { ConnectionGate(listener: listener, limit: configuration.maxConnections) }

    /// SIGHUP: certificates and keys are read again; open connections keep what they have.
    func reload(logger: Logger) {
        credentials?.reload(logger: logger)
        gatekeeper.reload(logger: logger)
    }

    /// An HTTP/1 listener's server: Hummingbird's HTTP1 channel behind TLS and the guard.
    /// `minimumRequestTimeout`: the admin listener takes bundle uploads of hundreds of megabytes.
    func httpServer(
        gate: ConnectionGate, minimumRequestTimeout: Duration = .zero,
        additionalHandlers: @escaping @Sendable () -> [any RemovableChannelHandler] = { [] }
    ) -> HTTPServerBuilder {
        let request = Self.timeAmount(max(configuration.requestTimeout, minimumRequestTimeout))
        let idle = Self.timeAmount(configuration.idleTimeout)
        let credentials = credentials
        return HTTPServerBuilder { responder in
            let base = HTTP1Channel(
                responder: responder,
                configuration: .init(additionalChannelHandlers: [RequestClockHandler()] + additionalHandlers()))
            return GuardedChannel(base: base, gate: gate, clocks: .http1(request: request, idle: idle), credentials: credentials)
        }
    }

    /// The gRPC listener's transport: grpc-swift-nio-transport's HTTP/2 server pipeline behind the
    /// guard (and TLS), idle connections closed after `idle_timeout_s`.
    func grpcTransport(host: String, port: Int, gate: ConnectionGate, maxRequestPayload: Int) -> HTTP2ServerTransport.Custom<GuardedListenerFactory> {
        var config = HTTP2ServerTransport.Custom<GuardedListenerFactory>.Config.defaults
        config.rpc.maxRequestPayloadSize = maxRequestPayload
        config.connection.maxIdleTime = configuration.idleTimeout
        // Each stream gets its clock (a request, or a streaming call's message, must arrive in time).
        config.channelDebuggingCallbacks.onAcceptHTTP2Stream = { stream in
            stream.eventLoop.makeCompletedFuture {
                guard let connection = stream.parent, let connectionGuard = try? connection.pipeline.syncOperations.handler(type: ConnectionGuard.self) else { return }
                try stream.pipeline.syncOperations.addHandler(StreamClock(connectionGuard: connectionGuard), position: .first)
            }
        }
        // A connection quiet for the idle timeout is pinged; a live peer answers at once (the
        // guard closes one that does not: ``ConnectionGuard/Clocks/silence(_:)``).
        config.connection.keepalive = .init(
            time: configuration.idleTimeout, timeout: keepaliveTimeout,
            clientBehavior: .init(minPingIntervalWithoutCalls: .seconds(5), allowWithoutCalls: true))
        return HTTP2ServerTransport.Custom(
            listenerFactory: GuardedListenerFactory(
                host: host, port: port, gate: gate, credentials: credentials,
                request: Self.timeAmount(configuration.requestTimeout), silence: Self.timeAmount(configuration.idleTimeout + keepaliveTimeout)),
            config: config)
    }
}

/// A Hummingbird child channel with the connection guard and TLS in front of `base`.
struct GuardedChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base
    let gate: ConnectionGate
    let clocks: ConnectionGuard.Clocks
    let credentials: TLSCredentials?

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            let pipeline = channel.pipeline.syncOperations
            if let credentials { try pipeline.addHandler(NIOSSLServerHandler(context: credentials.context(.http1))) }
            try pipeline.addHandler(ConnectionGuard(gate: gate, clocks: clocks))
        }.flatMap {
            base.setup(channel: channel, logger: logger)
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

extension GuardedChannel: HTTPChannelHandler where Base: HTTPChannelHandler {
    var responder: HTTPChannelHandler.Responder { base.responder }
}

/// The gRPC listener, bound as grpc-swift-nio-transport's own Posix listener is, with the
/// connection guard and TLS (from the current credentials, for reloads) on each connection.
struct GuardedListenerFactory: HTTP2ServerTransport.ListenerFactory {
    let host: String
    let port: Int
    let gate: ConnectionGate
    let credentials: TLSCredentials?
    let request: TimeAmount
    let silence: TimeAmount
    var eventLoopGroup: any EventLoopGroup { MultiThreadedEventLoopGroup.singleton }

    func makeListeningChannel(
        listenerConfigurator: HTTP2ServerTransport.ListenerConfigurator,
        connectionConfigurator: HTTP2ServerTransport.ConnectionConfigurator
    ) async throws -> NIOAsyncChannel<HTTP2ServerTransport.ConnectionConfigurator.ConnectionChannel, Never> {
        let gate = gate
        let credentials = credentials
        let clocks = ConnectionGuard.Clocks.http2(request: request, silence: silence)
        return try await ServerBootstrap(group: eventLoopGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 4096)
            .serverChannelInitializer { channel in listenerConfigurator.configure(channel: channel) }
            .bind(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    if let credentials { try pipeline.addHandler(NIOSSLServerHandler(context: credentials.context(.grpc))) }
                    try pipeline.addHandler(ConnectionGuard(gate: gate, clocks: clocks))
                }.flatMap {
                    connectionConfigurator.configure(channel: channel, tls: credentials == nil ? .none : .configured(requireALPN: false))
                }
            }
    }
}

/// Reloads the edge's certificates and keys on SIGHUP, until the server stops.
struct EdgeReloader: Service {
    let edge: Edge
    let logger: Logger

    func run() async throws {
        let signals = await UnixSignalsSequence(trapping: .sighup)
        for await _ in signals.cancelOnGracefulShutdown() {
            logger.info("SIGHUP: reloading TLS certificates and API keys")
            edge.reload(logger: logger)
        }
    }
}
