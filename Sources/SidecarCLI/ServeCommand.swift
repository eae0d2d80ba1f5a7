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

    @OptionGroup var hostArguments: HostArguments

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
        if hostArguments.cacheDir != nil || !hostArguments.pipArgs.isEmpty { configuration.hostOptions = hostArguments.hostOptions() }
        guard !configuration.models.isEmpty else {
            throw ValidationError("give at least one model directory (or models: in --config)")
        }
        // A bad directory fails in one line, with exit code 2, before anything starts.
        for directory in configuration.models {
            do { _ = try ModelBundle(directory: directory) } catch { throw reportFailure(error) }
        }
        let (count, address) = (configuration.models.count, configuration.host)
        do {
            try await runServer(configuration, logger: logger) { http, grpc in
                logger.notice("serving \(count) model(s): HTTP on \(address):\(http), gRPC on \(address):\(grpc)")
            }
        } catch {
            throw reportFailure(error)
        }
    }
}
