import GRPCCore

/// Asks the ``Gatekeeper`` for a key on every gRPC method but the two inference ones (whose
/// handlers check the key against the model each request names) and those `auth.open` leaves
/// open: health (`grpc.health.v1.Health`, ServerLive, ServerReady, ModelReady) and metadata
/// (ServerMetadata, ModelMetadata, ModelConfig).
struct GateInterceptor: ServerInterceptor {
    let gatekeeper: Gatekeeper

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>,
        context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let method = context.descriptor.method
        if !["ModelInfer", "ModelStreamInfer"].contains(method) {
            let category: EndpointCategory? =
                context.descriptor.service.fullyQualifiedService == "grpc.health.v1.Health" || ["ServerLive", "ServerReady", "ModelReady"].contains(method)
                ? .health : ["ServerMetadata", "ModelMetadata", "ModelConfig"].contains(method) ? .metadata : nil
            do {
                if let category { try gatekeeper.check(category, request.metadata.value) } else { _ = try gatekeeper.authenticate(request.metadata.value) }
            } catch {
                throw FrontError.from(error).rpcError
            }
        }
        return try await next(request, context)
    }
}

extension Metadata {
    /// A metadata value by its (lower-case) key, for the gatekeeper.
    func value(_ key: String) -> String? { self[stringValues: key].first(where: { _ in true }) }
}
