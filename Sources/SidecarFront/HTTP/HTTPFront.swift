import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOFoundationCompat
import Sidecar

/// The HTTP front: Open Inference Protocol v2 (JSON and binary tensors), KServe v1, health and
/// Prometheus metrics, all on one Hummingbird router. Every route drives the same ``ModelHost``, so
/// requests from every connection and protocol share each model's batcher.
struct HTTPFront: Sendable {
    let host: ModelHost
    let readiness: ServerReadiness
    let metrics: FrontMetrics
    /// The largest request body accepted; larger ones are answered 413.
    let maxBodyBytes: Int
    /// With `serve --repository`: this node's repository sync, whose manifest and bundles it serves
    /// read-only at `/repository/`, so other nodes can fetch from it.
    var repository: RepositorySync? = nil
    /// The inboxes, for `/status`.
    var inboxes: InboxService? = nil
    /// API keys and rate limits (nil: none).
    var gatekeeper: Gatekeeper? = nil

    static let inferenceHeaderLength = HTTPField.Name("Inference-Header-Content-Length")!
    /// On an answer from the model's fallback: why (`error`, `timeout`, `queue_full`, ...).
    static let fallbackHeader = HTTPField.Name("Sidecar-Fallback")!

    func router() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        // Each group of routes is what `auth.open` names; the gate is decided by the route that
        // matched, never by parsing the path again. Inference routes check the key in their
        // handlers, against the model they resolve.
        func group(_ category: EndpointCategory?) -> RouterGroup<BasicRequestContext> {
            let group = router.group()
            if let gatekeeper, gatekeeper.requiresKeys { group.add(middleware: GateMiddleware(gatekeeper: gatekeeper, category: category)) }
            return group
        }
        let health = group(.health)
        let metadata = group(.metadata)
        health.get("v2/health/live") { _, _ in json(["live": true]) }
        health.get("v2/health/ready") { _, _ in
            let ready = readiness.isReady
            return json(["ready": ready], status: ready ? .ok : .serviceUnavailable)
        }
        metadata.get("v2") { _, _ in
            json(ServerMetadata(name: "sidecar", version: sidecarVersion, extensions: ["binary_tensor_data", "kserve_v1", "metrics"]))
        }
        metadata.get("v2/models/{model}") { _, context in try self.metadata(context) }
        metadata.get("v2/models/{model}/versions/{version}") { _, context in try self.metadata(context) }
        health.get("v2/models/{model}/ready") { _, context in try modelReady(context) }
        health.get("v2/models/{model}/versions/{version}/ready") { _, context in try modelReady(context) }
        router.post("v2/models/{model}/infer") { request, context in try await infer(request, context) }
        router.post("v2/models/{model}/versions/{version}/infer") { request, context in try await infer(request, context) }
        router.post("v1/models/{spec}") { request, context in try await predictV1(request, context) }
        metadata.get("status") { _, _ in json(StatusReport.host(host, repository: repository, inboxes: inboxes)) }
        metadata.get("status/{model}") { _, context in
            let name = try context.parameters.require("model")
            guard let model = host.model(named: name) else {
                throw FrontError.from(host.noModel(named: name))
            }
            return json(StatusReport.model(model, host: host))
        }
        if let repository {
            // A model's code and weights: always behind a key when keys are on.
            let bundles = group(nil)
            bundles.get("repository/manifest.json") { _, _ in
                guard let data = repository.manifestData else {
                    throw FrontError(.unavailable, "this node has not read its repository's manifest yet")
                }
                var headers = HTTPFields()
                headers[.contentType] = "application/json"
                return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(data: data)))
            }
            for folder in ["bundles", "files"] {
                bundles.get("repository/\(folder)/{file}") { _, context in try repositoryFile(folder, context, repository) }
            }
        }
        group(.metrics).get("metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: metrics.exposition(host: host))))
        }
        return router
    }

    /// A bundle, file index or file this node holds, read-only (so nodes can fetch from each other).
    private func repositoryFile(_ folder: String, _ context: BasicRequestContext, _ repository: RepositorySync) throws -> Response {
        let file = try context.parameters.require("file")
        guard let url = repository.store.served("\(folder)/\(file)") else {
            throw FrontError(.notFound, "this node has no \(folder)/\(file.prefix(80))")
        }
        let data = try Data(contentsOf: url, options: .mappedIfSafe)
        var headers = HTTPFields()
        headers[.contentType] = file.hasSuffix(".json") ? "application/json" : file.hasSuffix(".tar.gz") ? "application/gzip" : "application/octet-stream"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(data: data)))
    }

    struct ServerMetadata: Encodable {
        var name: String
        var version: String
        var extensions: [String]
    }

    struct ModelMetadata: Encodable {
        struct TensorMetadata: Encodable {
            var name: String
            var datatype: String
            var shape: [Int]
        }

        var name: String
        var versions: [String]
        var platform: String
        var inputs: [TensorMetadata]
        var outputs: [TensorMetadata]
    }

    private func model(_ context: BasicRequestContext, routingKey: String? = nil) throws -> Model {
        let name = try context.parameters.require("model")
        do {
            return try host.resolve(name, version: context.parameters.get("version"), routingKey: routingKey)
        } catch {
            throw FrontError.from(error)
        }
    }

    private func metadata(_ context: BasicRequestContext) throws -> Response {
        let model = try model(context)
        func describe(_ specs: [TensorSpec]) -> [ModelMetadata.TensorMetadata] {
            specs.map { .init(name: $0.name, datatype: $0.datatype.rawValue, shape: $0.shape) }
        }
        return json(ModelMetadata(
            name: model.name, versions: host.versionNames(of: model), platform: "sidecar_python",
            inputs: describe(model.configuration.inputs), outputs: describe(model.configuration.outputs)))
    }

    private func modelReady(_ context: BasicRequestContext) throws -> Response {
        let model = try model(context)
        return json(["ready": model.isReady], status: model.isReady ? .ok : .serviceUnavailable)
    }

    /// The request's key may call `model`, and neither it nor the model is over its rate.
    private func admit(_ request: Request, model: String) throws {
        guard let gatekeeper, gatekeeper.isActive else { return }
        let key = try gatekeeper.authenticate(request.headers.value)
        try gatekeeper.admit(key, model: model, known: isLoaded(model))
    }

    private func isLoaded(_ name: String) -> Bool { host.model(named: name) != nil || host.versions(of: name) != nil }

    /// A failed request's model label: its name only if it is loaded (refused before the name was
    /// resolved, by a key or a rate, a made-up name must not become a label).
    private func label(_ name: String) -> String { isLoaded(name) ? name : FrontMetrics.unknownModel }

    private func body(_ request: Request) async throws -> Data {
        let tooLarge = FrontError(.tooLarge, "the request body exceeds the limit of \(maxBodyBytes) bytes (--max-body-bytes)")
        // Refuse by the declared length before reading anything; a chunked body is cut off at the limit.
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > maxBodyBytes { throw tooLarge }
        do {
            return Data(buffer: try await request.body.collect(upTo: maxBodyBytes))
        } catch is NIOTooManyBytesError {
            throw tooLarge
        }
    }

    private func infer(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let start = ContinuousClock.now
        let name = context.parameters.get("model") ?? "?"
        do {
            // The key, the rate limits, the name and the room are checked before the body is read:
            // an overload is refused before anything is decoded. The version is picked after, by
            // the request's id.
            try admit(request, model: name)
            try host.refuseEarly(name, version: context.parameters.get("version"))
            let headerLength = try HTTPInference.headerLength(request.headers[Self.inferenceHeaderLength])
            let decoded = try HTTPInference.decode(try await body(request), headerLength: headerLength)
            let model = try model(context, routingKey: decoded.id)
            let deadline = Deadlines.deadline(
                from: start, decoded.timeout, try Deadlines.timeout(header: request.headers[Deadlines.header]))
            let served = try await model.serveInference(decoded.inputs, deadline: deadline)
            let (payload, jsonLength) = try HTTPInference.encode(
                served.value, for: decoded, model: model.name, version: model.servedVersion, fallback: served.fallback)
            var headers = HTTPFields()
            if let fallback = served.fallback { headers[Self.fallbackHeader] = fallback.reason.rawValue }
            if let jsonLength {
                headers[.contentType] = "application/octet-stream"
                headers[Self.inferenceHeaderLength] = "\(jsonLength)"
            } else {
                headers[.contentType] = "application/json"
            }
            metrics.record(model: name, protocol: "http", since: start, error: nil)
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(data: payload)))
        } catch {
            let failure = FrontError.from(error)
            metrics.record(model: label(name), protocol: "http", since: start, error: failure)
            throw failure
        }
    }

    /// KServe v1: `{"instances": [...]}` → `{"predictions": [...]}`, each instance one item.
    private func predictV1(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let start = ContinuousClock.now
        let spec = try context.parameters.require("spec")
        guard spec.hasSuffix(":predict") else {
            throw FrontError(.notFound, "unknown KServe v1 verb in '\(spec)'; use POST /v1/models/NAME:predict")
        }
        let name = String(spec.dropLast(":predict".count))
        do {
            try admit(request, model: name)
            let model = try host.resolve(name)
            try host.refuseEarly(name)
            let items = try KServeV1.items(from: try await body(request))
            let deadline = Deadlines.deadline(from: start, try Deadlines.timeout(header: request.headers[Deadlines.header]))
            let served = try await model.servePredictions(items, deadline: deadline)
            let out = try KServeV1.response(served.value)
            metrics.record(model: name, protocol: "kserve_v1", since: start, error: nil)
            var headers = HTTPFields()
            if let fallback = served.fallback { headers[Self.fallbackHeader] = fallback.reason.rawValue }
            headers[.contentType] = "application/json"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(data: out)))
        } catch {
            let failure = FrontError.from(error)
            metrics.record(model: label(name), protocol: "kserve_v1", since: start, error: failure)
            throw failure
        }
    }
}

/// A JSON response.
func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) -> Response {
    var headers = HTTPFields()
    headers[.contentType] = "application/json"
    let encoder = JSONEncoder()
    encoder.outputFormatting = .sortedKeys  // stable output for people and for diffs in scripts
    let body = (try? encoder.encode(value)) ?? Data("{}".utf8)
    return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(data: body)))
}

let sidecarVersion = "0.1.0"
