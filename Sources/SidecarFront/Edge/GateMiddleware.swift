import HTTPTypes
import Hummingbird

/// Asks the ``Gatekeeper`` for a key on a group of routes: those of one ``EndpointCategory``
/// (skipped when `auth.open` names it), or, with no category, always (the repository's bundles).
/// The inference routes have none: their handlers check the key against the model they resolve.
struct GateMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let gatekeeper: Gatekeeper
    let category: EndpointCategory?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if let category {
            try gatekeeper.check(category, request.headers.value)
        } else {
            _ = try gatekeeper.authenticate(request.headers.value)
        }
        return try await next(request, context)
    }
}

extension HTTPFields {
    /// A header's value by its name, for the gatekeeper.
    func value(_ name: String) -> String? { HTTPField.Name(name).flatMap { self[$0] } }
}
