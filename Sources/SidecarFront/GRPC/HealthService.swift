import GRPCCore
import ServiceLifecycle
import Sidecar
import SidecarOIPProtocol

/// `grpc.health.v1.Health`: the empty service name is the whole server's readiness (serving when
/// every model that is not FAILED has a ready worker), `liveness` is the process answering (for a
/// Kubernetes gRPC liveness probe, which must not fail while models load), a model's name is that
/// model, and `inference.GRPCInferenceService` is the inference service itself.
struct HealthService: Grpc_Health_V1_Health.SimpleServiceProtocol {
    let host: ModelHost
    let readiness: ServerReadiness

    func check(request: Grpc_Health_V1_HealthCheckRequest, context: ServerContext) async throws -> Grpc_Health_V1_HealthCheckResponse {
        guard let status = status(of: request.service) else {
            throw FrontError(.notFound, "unknown service '\(request.service)'; use '' (readiness), liveness, a model name, or inference.GRPCInferenceService").rpcError
        }
        return .with { $0.status = status }
    }

    /// Sends the status now and again whenever it changes, until the client cancels or the server
    /// shuts down (a graceful shutdown waits for open streams, so a watch must end by itself).
    func watch(
        request: Grpc_Health_V1_HealthCheckRequest, response: RPCWriter<Grpc_Health_V1_HealthCheckResponse>, context: ServerContext
    ) async throws {
        var last: Grpc_Health_V1_HealthCheckResponse.ServingStatus?
        while !Task.isCancelled, !context.cancellation.isCancelled, !Task.isShuttingDownGracefully {
            let current = status(of: request.service) ?? .serviceUnknown
            if current != last {
                try await response.write(.with { $0.status = current })
                last = current
            }
            try? await Task.sleep(for: .milliseconds(250))
        }
    }

    private func status(of service: String) -> Grpc_Health_V1_HealthCheckResponse.ServingStatus? {
        if service == "liveness" { return .serving }
        if service.isEmpty || service == "inference.GRPCInferenceService" {
            return readiness.isReady ? .serving : .notServing
        }
        guard let model = host.model(named: service) else { return nil }
        return model.isReady ? .serving : .notServing
    }
}
