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
    /// Address of the admin API: loopback by default; anywhere else it requires `adminToken`.
    public var adminHost = "127.0.0.1"
    /// Port of the admin API; nil turns it off.
    public var adminPort: Int? = 8002
    /// The bearer token the admin API requires (from `admin_token_file`, `--admin-token-file` or
    /// `$SIDECAR_ADMIN_TOKEN`). Required when the admin API is not on loopback.
    public var adminToken: String?
    /// Where uploaded bundles are unpacked (default: `bundles/` in the environment cache).
    public var bundleDirectory: URL?
    /// Largest uploaded bundle, compressed (default 256 MiB).
    public var bundleMaxBytes = 256 << 20
    /// The model repository this node serves (a directory or an http(s) base URL); nil: none.
    public var repository: String?
    /// How often the repository's manifest is checked (a stat or a conditional GET).
    public var repositoryPollInterval: Duration = .seconds(10)
    /// Bundles kept on disk per model beyond those loaded (its most recent versions, for rollback).
    public var keepVersions = 3
    /// Inboxes by model name (`inboxes:`), over what the models' own `sidecar.yaml` say.
    public var inboxes: [String: InboxConfiguration] = [:]
    /// TLS, API keys, rate limits and connection limits (`tls:`, `auth:`, `rate_limits:`, `limits:`).
    public var edge = EdgeConfiguration()

    /// A relative repository directory is relative to the configuration file; a URL stays as it is.
    public static func resolveRepository(_ source: String, base: URL) -> String {
        if source.hasPrefix("http://") || source.hasPrefix("https://") || source.hasPrefix("/") { return source }
        return base.appendingPathComponent(source).path
    }

    /// What each number may be, for the configuration file and the command line alike.
    public enum Limits {
        public static let port = 0...65535
        public static let bodyBytes = 1...(1 << 34)
        /// gRPC messages are framed with a 32-bit length.
        public static let grpcMessageBytes = 1...Int(Int32.max)
    }

    public init() {}
}

/// The ports a running server listens on.
public struct ListeningPorts: Sendable {
    public var http: Int
    public var grpc: Int
    public var admin: Int?
}

/// Runs a Sidecar server until SIGTERM or SIGINT: the model host, the HTTP front, the gRPC front and
/// the admin API in one `ServiceGroup`. On a signal the fronts stop accepting and finish what is in flight, then
/// the host drains and stops the workers.
///
/// `onListening` is called with the bound HTTP and gRPC ports once both listen (useful with port 0).
public func runServer(
    _ configuration: ServerConfiguration, logger: Logger,
    onListening: @escaping @Sendable (ListeningPorts) -> Void = { _ in }
) async throws {
    if let port = configuration.adminPort, configuration.adminToken == nil, !isLoopback(configuration.adminHost) {
        throw SidecarError(
            .invalidConfiguration,
            "the admin API would listen on \(configuration.adminHost):\(port) without a token; set admin_token_file "
                + "(or --admin-token-file, or $SIDECAR_ADMIN_TOKEN), or bind it to 127.0.0.1")
    }
    let metrics = FrontMetrics.shared()  // first: it bootstraps the metrics the rest create
    // Certificates and keys are read before anything starts: a bad file stops the server here.
    let edge = try Edge(configuration.edge, logger: logger)
    let host = ModelHost(options: configuration.hostOptions, logger: logger)
    // Bundles by sha256: fetched from the repository, or pushed by `sidecar deploy`.
    let store = BundleStore(
        root: configuration.hostOptions.environment.cacheDirectory.appendingPathComponent("repository"),
        limits: BundleArchive.Limits(maxCompressedBytes: configuration.bundleMaxBytes))
    let sync = configuration.repository.map { source in
        RepositorySync(
            source: repositorySource(source), host: host, store: store,
            pollInterval: configuration.repositoryPollInterval, keep: configuration.keepVersions, logger: logger)
    }
    let readiness = ServerReadiness(host: host, repository: sync)
    try InboxService.check(configuration.inboxes)
    let inboxes = InboxService(
        host: host, configured: configuration.inboxes, readiness: readiness, requireConfiguredModels: configuration.repository == nil, logger: logger)
    let ports = PortReport(expectAdmin: configuration.adminPort != nil, onListening)

    let gatekeeper = edge.gatekeeper
    let http = Application(
        router: HTTPFront(
            host: host, readiness: readiness, metrics: metrics, maxBodyBytes: configuration.maxBodyBytes, repository: sync, inboxes: inboxes,
            gatekeeper: gatekeeper
        ).router(),
        // An overloaded model's requests are refused from their heads on the event loop.
        server: edge.httpServer(gate: edge.gate("http"), additionalHandlers: { [EarlyRefusalHandler(host: host, metrics: metrics, gatekeeper: gatekeeper)] }),
        // A long backlog: under a flood of connections new clients wait in it rather than be dropped.
        configuration: .init(address: .hostname(configuration.host, port: configuration.httpPort), serverName: "sidecar", backlog: 4096),
        onServerRunning: { channel in ports.http(channel.localAddress?.port ?? configuration.httpPort) },
        logger: logger)

    // The transport resets a stream whose message exceeds its cap (clients see CANCELLED), so the
    // configured limit is enforced by the service, which answers RESOURCE_EXHAUSTED with a message;
    // the transport's cap stays 4× higher as a memory backstop.
    let transport = edge.grpcTransport(
        host: configuration.host, port: configuration.grpcPort, gate: edge.gate("grpc"),
        maxRequestPayload: Checked.multiply(configuration.maxGRPCMessageBytes, 4).map { min(Int(Int32.max), $0) } ?? Int(Int32.max))
    let inference = InferenceService(
        host: host, readiness: readiness, metrics: metrics, maxMessageBytes: configuration.maxGRPCMessageBytes, gatekeeper: gatekeeper)
    let grpc = GRPCServer(
        transport: transport,
        services: [InferenceServiceRegistration(service: inference), HealthService(host: host, readiness: readiness)],
        interceptors: gatekeeper.requiresKeys ? [GateInterceptor(gatekeeper: gatekeeper)] : [])

    var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
        .init(service: host),
        .init(service: ModelLoader(
            host: host, readiness: readiness, directories: configuration.models, workers: configuration.workers,
            strictFallbacks: configuration.repository == nil, logger: logger)),
        .init(service: GRPCServerService(server: grpc, transport: transport, ports: ports)),
        .init(service: http),
        .init(service: EdgeReloader(edge: edge, logger: logger)),
    ]
    if let sync { services.append(.init(service: sync)) }
    if let adminPort = configuration.adminPort {
        let bundles = configuration.bundleDirectory ?? configuration.hostOptions.environment.cacheDirectory.appendingPathComponent("bundles")
        let admin = AdminFront(
            host: host, token: configuration.adminToken, bundleDirectory: bundles, repository: sync, store: store,
            bundleLimits: BundleArchive.Limits(maxCompressedBytes: configuration.bundleMaxBytes))
        services.append(.init(service: Application(
            router: admin.router(),
            server: edge.httpServer(gate: edge.gate("admin"), minimumRequestTimeout: .seconds(600)),
            configuration: .init(address: .hostname(configuration.adminHost, port: adminPort), serverName: "sidecar-admin", backlog: 4096),
            onServerRunning: { channel in ports.admin(channel.localAddress?.port ?? adminPort) },
            logger: logger)))
    }
    // Last, so that a graceful shutdown stops the inboxes first: what they read is answered and
    // published while the models still serve.
    services.append(.init(service: inboxes))
    let group = ServiceGroup(
        configuration: .init(
            services: services,
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
    /// Without a repository every fallback must be among the models loaded here; with one, a
    /// fallback may be a repository model still on its way, so a missing one is only a warning.
    var strictFallbacks = true
    var logger = Logger(label: "sidecar")

    func run() async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for directory in directories {
                group.addTask { try await host.load(directory, workers: workers) }
            }
            try await group.waitForAll()
        }
        do { try host.checkFallbacks() } catch where !strictFallbacks {
            logger.warning("\(error)")
        }
        readiness.markLoaded()
        try? await gracefulShutdown()
    }
}

/// The server is ready once the models it was started with have loaded and each has a ready worker
/// (so a Kubernetes readiness probe does not send traffic to a server still building environments),
/// and, with a repository, once it has loaded what the manifest asks for.
final class ServerReadiness: Sendable {
    let host: ModelHost
    let repository: RepositorySync?
    private let loaded = Mutex(false)

    init(host: ModelHost, loaded: Bool = false, repository: RepositorySync? = nil) {
        self.host = host
        self.repository = repository
        self.loaded.withLock { $0 = loaded }
    }

    func markLoaded() { loaded.withLock { $0 = true } }

    /// The models the server was started with have loaded.
    var hasLoaded: Bool { loaded.withLock { $0 } }

    /// A FAILED model does not make the server unready: it refuses its own requests (503) and says
    /// why, while the server's other models serve; otherwise one crash-looping model would take every
    /// pod out of its Service, healthy models included.
    var isReady: Bool {
        loaded.withLock { $0 } && repository?.isCaughtUp != false
            && host.modelNames.allSatisfy { name in
                guard let model = host.model(named: name) else { return true }
                if case .failed = model.state { return true }
                return model.isReady
            }
    }
}

/// The gRPC server as a `Service`.
struct GRPCServerService: Service {
    let server: GRPCServer<HTTP2ServerTransport.Custom<GuardedListenerFactory>>
    let transport: HTTP2ServerTransport.Custom<GuardedListenerFactory>
    let ports: PortReport

    func run() async throws {
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.serve() }
                if let address = await transport.listeningAddress, let port = address.ipv4?.port ?? address.ipv6?.port {
                    ports.grpc(port)
                }
                try await group.waitForAll()
            }
        } onGracefulShutdown: {
            server.beginGracefulShutdown()
        }
    }
}

/// Calls back once every listener has reported its bound port.
final class PortReport: Sendable {
    private struct Ports {
        var http: Int?
        var grpc: Int?
        var admin: Int?
        var reported = false
    }

    private let state = Mutex(Ports())
    private let expectAdmin: Bool
    private let callback: @Sendable (ListeningPorts) -> Void

    init(expectAdmin: Bool = false, _ callback: @escaping @Sendable (ListeningPorts) -> Void) {
        self.expectAdmin = expectAdmin
        self.callback = callback
    }

    func http(_ port: Int) { report { $0.http = port } }
    func grpc(_ port: Int) { report { $0.grpc = port } }
    func admin(_ port: Int) { report { $0.admin = port } }

    private func report(_ update: (inout Ports) -> Void) {
        let complete: ListeningPorts? = state.withLock { ports in
            update(&ports)
            guard !ports.reported, let http = ports.http, let grpc = ports.grpc, !expectAdmin || ports.admin != nil else { return nil }
            ports.reported = true
            return ListeningPorts(http: http, grpc: grpc, admin: ports.admin)
        }
        if let complete { callback(complete) }
    }
}

/// Whether `host` names the loopback interface only.
func isLoopback(_ host: String) -> Bool {
    host == "localhost" || host == "::1" || host.hasPrefix("127.")
}
