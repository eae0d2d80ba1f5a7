import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Hummingbird
import Logging
import ServiceLifecycle
import Sidecar
import Synchronization

/// Everything `sidecar serve` needs to know.
public struct ServerConfiguration: Sendable {
    /// Model directories to load at start.
    public var models: [String] = []
    /// Overrides `workers` of every model.
    public var workers: Int?
    /// Address both fronts bind; loopback unless told otherwise.
    public var host = "127.0.0.1"
    public var httpPort = 8000
    public var grpcPort = 8001
    /// Largest HTTP request body (413 beyond it).
    public var maxBodyBytes = 64 << 20
    /// Largest gRPC message received (RESOURCE_EXHAUSTED beyond it); far above gRPC's 4 MB default
    /// because inference clients send large tensors.
    public var maxGRPCMessageBytes = 64 << 20
    public var hostOptions = HostOptions()

    public init() {}
}

/// Runs a Sidecar server until SIGTERM or SIGINT: the model host, the HTTP front and the gRPC front
/// in one `ServiceGroup`. On a signal the fronts stop accepting and finish what is in flight, then
/// the host drains and stops the workers.
///
/// `onListening` is called with the bound HTTP and gRPC ports once both listen (useful with port 0).
public func runServer(
    _ configuration: ServerConfiguration, logger: Logger,
    onListening: @escaping @Sendable (_ httpPort: Int, _ grpcPort: Int) -> Void = { _, _ in }
) async throws {
    let host = ModelHost(options: configuration.hostOptions, logger: logger)
    let metrics = FrontMetrics.shared()
    let readiness = ServerReadiness(host: host)
    let ports = PortReport(onListening)

    let http = Application(
        router: HTTPFront(host: host, readiness: readiness, metrics: metrics, maxBodyBytes: configuration.maxBodyBytes).router(),
        configuration: .init(address: .hostname(configuration.host, port: configuration.httpPort), serverName: "sidecar"),
        onServerRunning: { channel in ports.http(channel.localAddress?.port ?? configuration.httpPort) },
        logger: logger)

    // The transport resets a stream whose message exceeds its cap (clients see CANCELLED), so the
    // configured limit is enforced by the service, which answers RESOURCE_EXHAUSTED with a message;
    // the transport's cap stays 4× higher as a memory backstop.
    var transportConfig = HTTP2ServerTransport.Posix.Config.defaults
    transportConfig.rpc.maxRequestPayloadSize = min(Int(Int32.max), configuration.maxGRPCMessageBytes * 4)
    let grpc = GRPCServer(
        transport: .http2NIOPosix(
            address: .ipv4(host: configuration.host, port: configuration.grpcPort), transportSecurity: .plaintext, config: transportConfig),
        services: [InferenceService(host: host, readiness: readiness, metrics: metrics, maxMessageBytes: configuration.maxGRPCMessageBytes), HealthService(host: host, readiness: readiness)])

    let group = ServiceGroup(
        configuration: .init(
            services: [
                .init(service: host),
                .init(service: ModelLoader(host: host, readiness: readiness, directories: configuration.models, workers: configuration.workers)),
                .init(service: GRPCServerService(server: grpc, ports: ports)),
                .init(service: http),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
    try await group.run()
}

/// Loads the models given at start, then waits for shutdown. A model that cannot load stops the
/// server with its error (the CLI prints it and exits non-zero).
struct ModelLoader: Service {
    let host: ModelHost
    let readiness: ServerReadiness
    let directories: [String]
    let workers: Int?

    func run() async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for directory in directories {
                group.addTask { try await host.load(directory, workers: workers) }
            }
            try await group.waitForAll()
        }
        readiness.markLoaded()
        try? await gracefulShutdown()
    }
}

/// The server is ready once the models it was started with have loaded and each has a ready worker
/// (so a Kubernetes readiness probe does not send traffic to a server still building environments).
final class ServerReadiness: Sendable {
    let host: ModelHost
    private let loaded = Mutex(false)

    init(host: ModelHost, loaded: Bool = false) {
        self.host = host
        self.loaded.withLock { $0 = loaded }
    }

    func markLoaded() { loaded.withLock { $0 = true } }

    var isReady: Bool {
        loaded.withLock { $0 } && host.modelNames.allSatisfy { host.model(named: $0)?.isReady == true }
    }
}

/// The gRPC server as a `Service`.
struct GRPCServerService: Service {
    let server: GRPCServer<HTTP2ServerTransport.Posix>
    let ports: PortReport

    func run() async throws {
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.serve() }
                if let address = try await server.listeningAddress?.ipv4 {
                    ports.grpc(address.port)
                }
                try await group.waitForAll()
            }
        } onGracefulShutdown: {
            server.beginGracefulShutdown()
        }
    }
}

/// Calls back once both fronts have reported their bound ports.
final class PortReport: Sendable {
    private let state = LockedPorts()
    private let callback: @Sendable (Int, Int) -> Void

    init(_ callback: @escaping @Sendable (Int, Int) -> Void) { self.callback = callback }

    func http(_ port: Int) { report { $0.http = port } }
    func grpc(_ port: Int) { report { $0.grpc = port } }

    private func report(_ update: (inout (http: Int?, grpc: Int?)) -> Void) {
        if let (http, grpc) = state.update(update) { callback(http, grpc) }
    }
}

private final class LockedPorts: Sendable {
    private let ports = Mutex<(http: Int?, grpc: Int?)>((nil, nil))

    /// Applies `update`; returns both ports when this update completed them.
    func update(_ update: (inout (http: Int?, grpc: Int?)) -> Void) -> (Int, Int)? {
        ports.withLock { ports in
            let wasComplete = ports.http != nil && ports.grpc != nil
            update(&ports)
            guard !wasComplete, let http = ports.http, let grpc = ports.grpc else { return nil }
            return (http, grpc)
        }
    }
}
