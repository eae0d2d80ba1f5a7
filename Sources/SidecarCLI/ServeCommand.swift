import ArgumentParser
import Foundation
import Logging
import Sidecar
import SidecarFront

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve model directories over HTTP and gRPC (Open Inference Protocol v2, KServe v1, health, metrics).",
        discussion: """
            Loads each model directory (its name comes from sidecar.yaml, else the directory name), then \
            serves until SIGTERM or SIGINT, when it stops accepting, finishes what is in flight and stops \
            the workers.

              sidecar serve Examples/iris
              curl -s localhost:8000/v1/models/iris:predict -d '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
            """)

    @Argument(help: "Model directories to serve.")
    var directories: [String] = []

    @Option(name: .long, help: "Worker processes per model (default: workers in each sidecar.yaml).")
    var workers: Int?

    @Option(name: .long, help: "Address to bind (default 127.0.0.1: loopback only).")
    var host: String?

    @Option(name: .long, help: "HTTP port (default 8000).")
    var httpPort: Int?

    @Option(name: .long, help: "gRPC port (default 8001).")
    var grpcPort: Int?

    @Option(name: .long, help: "Largest HTTP request body in bytes (default 64 MiB); larger gets 413.")
    var maxBodyBytes: Int?

    @Option(name: .long, help: "Largest gRPC message in bytes (default 64 MiB); larger gets RESOURCE_EXHAUSTED.")
    var maxGrpcMessageBytes: Int?

    @Option(name: .long, help: "Server configuration file (YAML; see Config/sidecar.yaml). Command-line options override it.")
    var config: String?

    @Option(name: .long, help: "Address of the admin API (default 127.0.0.1; anywhere else needs an admin token).")
    var adminHost: String?

    @Option(name: .long, help: "Port of the admin API (default 8002).")
    var adminPort: Int?

    @Flag(name: .long, help: "Turn the admin API off.")
    var noAdmin = false

    @Option(name: .long, help: "File holding the admin API's bearer token (else $SIDECAR_ADMIN_TOKEN).")
    var adminTokenFile: String?

    @Flag(name: .long, help: "Benchmarking only: answer every item with itself in Swift, starting no Python workers (measures the front alone).")
    var benchmarkEcho = false

    @Option(name: .long, help: "A model repository to serve and follow: a directory, or an http(s) base URL (a web server, or another node's http://HOST:PORT/repository/).")
    var repository: String?

    @Option(name: .long, help: "Seconds between checks of the repository's manifest (default 10).")
    var pollInterval: Double?

    @Option(name: .long, help: "Bundles kept on disk per model beyond those loaded, for fast rollbacks (default 3).")
    var keepVersions: Int?

    @OptionGroup var hostArguments: HostArguments

    func validate() throws {
        func check(_ value: Int?, _ flag: String, _ range: ClosedRange<Int>) throws {
            guard let value, !range.contains(value) else { return }
            throw ValidationError("--\(flag) must be from \(range.lowerBound) to \(range.upperBound), got \(value)")
        }
        try check(workers, "workers", ModelConfiguration.workerRange)
        try check(httpPort, "http-port", ServerConfiguration.Limits.port)
        try check(grpcPort, "grpc-port", ServerConfiguration.Limits.port)
        try check(adminPort, "admin-port", ServerConfiguration.Limits.port)
        try check(maxBodyBytes, "max-body-bytes", ServerConfiguration.Limits.bodyBytes)
        try check(maxGrpcMessageBytes, "max-grpc-message-bytes", ServerConfiguration.Limits.grpcMessageBytes)
        try check(keepVersions, "keep-versions", 0...1000)
        if let pollInterval, !(pollInterval >= 0.1 && pollInterval <= 86_400) {
            throw ValidationError("--poll-interval must be from 0.1 to 86400 seconds, got \(pollInterval)")
        }
    }

    func run() async throws {
        let logger = try hostArguments.logger()
        var configuration = ServerConfiguration()
        if let config {
            do { configuration = try ServerConfigurationFile.read(config) } catch { throw reportFailure(error) }
        }
        configuration.models += directories
        if let workers { configuration.workers = workers }
        if let host { configuration.host = host }
        if let httpPort { configuration.httpPort = httpPort }
        if let grpcPort { configuration.grpcPort = grpcPort }
        if let maxBodyBytes { configuration.maxBodyBytes = maxBodyBytes }
        if let maxGrpcMessageBytes { configuration.maxGRPCMessageBytes = maxGrpcMessageBytes }
        // Each option overrides only its own key of --config.
        if let cacheDir = hostArguments.cacheDir { configuration.hostOptions.environment.cacheDirectory = URL(fileURLWithPath: cacheDir) }
        if !hostArguments.pipArgs.isEmpty { configuration.hostOptions.environment.pipArgs = hostArguments.pipArgs }
        if benchmarkEcho { configuration.hostOptions.benchmarkEcho = true }
        if let adminHost { configuration.adminHost = adminHost }
        if let adminPort { configuration.adminPort = adminPort }
        if noAdmin { configuration.adminPort = nil }
        if let repository {
            configuration.repository = ServerConfiguration.resolveRepository(repository, base: URL(fileURLWithPath: FileManager.default.currentDirectoryPath))
        }
        if let pollInterval { configuration.repositoryPollInterval = .milliseconds(Int64(pollInterval * 1000)) }
        if let keepVersions { configuration.keepVersions = keepVersions }
        if let adminTokenFile {
            do { configuration.adminToken = try readAdminToken(file: adminTokenFile) } catch { throw reportFailure(error) }
        }
        if configuration.adminToken == nil, let token = ProcessInfo.processInfo.environment["SIDECAR_ADMIN_TOKEN"], !token.isEmpty {
            configuration.adminToken = token
        }
        guard !configuration.models.isEmpty || configuration.adminPort != nil || configuration.repository != nil else {
            throw ValidationError("give at least one model directory (or models: in --config), a --repository, or keep the admin API on to load models later")
        }
        // A bad directory fails in one line, with exit code 2, before anything starts.
        for directory in configuration.models {
            do { _ = try ModelBundle(directory: directory) } catch { throw reportFailure(error) }
        }
        let (count, address, repository) = (configuration.models.count, configuration.host, configuration.repository)
        do {
            let adminHost = configuration.adminHost
            try await runServer(configuration, logger: logger) { ports in
                let admin = ports.admin.map { ", admin API on \(adminHost):\($0)" } ?? ""
                let what = count == 0 && repository != nil ? "the repository's models" : "\(count) model(s)"
                logger.notice("serving \(what): HTTP on \(address):\(ports.http), gRPC on \(address):\(ports.grpc)\(admin)")
            }
        } catch {
            throw reportFailure(error)
        }
    }
}
