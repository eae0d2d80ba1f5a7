import HTTPTypes
import Hummingbird

/// Asks the ``Gatekeeper`` for a key on every HTTP route but the inference ones (whose handlers
/// check the key against the model they resolve) and those `auth.open` leaves open.
struct GateMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let gatekeeper: Gatekeeper

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        if EarlyRefusalHandler.inferenceTarget(path) == nil, !Self.isInference(path) {
            if let category = Self.category(path) {
                try gatekeeper.check(category, request.headers.value)
            } else {
                _ = try gatekeeper.authenticate(request.headers.value)
            }
        }
        return try await next(request, context)
    }

    /// Inference paths the early handler does not parse (escaped names): their handler checks.
    static func isInference(_ path: String) -> Bool {
        (path.hasPrefix("/v2/models/") && path.hasSuffix("/infer")) || (path.hasPrefix("/v1/models/") && path.hasSuffix(":predict"))
    }

    /// What an endpoint is, for `auth.open`; nil for anything that always needs a key (the
    /// repository's bundles, which hold a model's code and weights).
    static func category(_ path: String) -> EndpointCategory? {
        let parts = path.split(separator: "/")
        switch parts.first {
        case "metrics": return parts.count == 1 ? .metrics : nil
        case "status": return .metadata
        case "v2":
            if parts.count == 1 { return .metadata }
            if parts[1] == "health" { return .health }
            if parts[1] == "models" { return parts.last == "ready" ? .health : .metadata }
            return nil
        default: return nil
        }
    }
}

extension HTTPFields {
    /// A header's value by its name, for the gatekeeper.
    func value(_ name: String) -> String? { HTTPField.Name(name).flatMap { self[$0] } }
}
