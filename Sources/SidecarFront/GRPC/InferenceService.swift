import Foundation
import GRPCCore
import Sidecar
import SidecarOIPProtocol

/// `inference.GRPCInferenceService`: the Open Inference Protocol v2 over gRPC. Requests from every
/// connection feed the same model batchers as the HTTP front.
struct InferenceService: Inference_GRPCInferenceService.SimpleServiceProtocol {
    let host: ModelHost
    let readiness: ServerReadiness
    let metrics: FrontMetrics
    /// Requests whose tensors exceed this are refused with RESOURCE_EXHAUSTED.
    let maxMessageBytes: Int
    /// API keys and rate limits (nil: none).
    var gatekeeper: Gatekeeper? = nil

    /// The key in a call's metadata, checked (nil without keys); throws UNAUTHENTICATED.
    func authenticate(_ metadata: Metadata) throws -> APIKey? {
        guard let gatekeeper, gatekeeper.isActive else { return nil }
        do { return try gatekeeper.authenticate(metadata.value) } catch { throw FrontError.from(error).rpcError }
    }

    /// `key` may call the model `raw` names, and neither is over its rate; throws
    /// PERMISSION_DENIED or RESOURCE_EXHAUSTED.
    func admit(_ key: APIKey?, _ raw: InferRequestBytes, since start: ContinuousClock.Instant) throws {
        guard let gatekeeper, gatekeeper.isActive else { return }
        // Bytes the peek cannot read (an unknown group field, which protobuf skips) are decoded
        // for their name: a request must never reach a model under the empty name's limits.
        let name = try InferRequestPeek(raw.bytes)?.model ?? raw.decoded().modelName
        let known = (try? host.resolve(name)) != nil
        do { try gatekeeper.admit(key, model: name, known: known) } catch {
            let failure = FrontError.from(error)
            metrics.record(model: known ? name : FrontMetrics.unknownModel, protocol: "grpc", since: start, error: failure)
            throw failure.rpcError
        }
    }

    func serverLive(request: Inference_ServerLiveRequest, context: ServerContext) async throws -> Inference_ServerLiveResponse {
        .with { $0.live = true }
    }

    func serverReady(request: Inference_ServerReadyRequest, context: ServerContext) async throws -> Inference_ServerReadyResponse {
        .with { $0.ready = readiness.isReady }
    }

    func modelReady(request: Inference_ModelReadyRequest, context: ServerContext) async throws -> Inference_ModelReadyResponse {
        let model = try model(request.name, version: request.version)
        return .with { $0.ready = model.isReady }
    }

    func serverMetadata(request: Inference_ServerMetadataRequest, context: ServerContext) async throws -> Inference_ServerMetadataResponse {
        .with {
            $0.name = "sidecar"
            $0.version = sidecarVersion
            $0.extensions = ["kserve_v1", "metrics"]
        }
    }

    func modelMetadata(request: Inference_ModelMetadataRequest, context: ServerContext) async throws -> Inference_ModelMetadataResponse {
        let model = try model(request.name, version: request.version)
        func describe(_ specs: [TensorSpec]) -> [Inference_ModelMetadataResponse.TensorMetadata] {
            specs.map { spec in .with { $0.name = spec.name; $0.datatype = spec.datatype.rawValue; $0.shape = spec.shape.map(Int64.init) } }
        }
        return .with {
            $0.name = model.name
            $0.versions = host.versionNames(of: model)
            $0.platform = "sidecar_python"
            $0.inputs = describe(model.configuration.inputs)
            $0.outputs = describe(model.configuration.outputs)
        }
    }

    func modelConfig(request: Inference_ModelConfigRequest, context: ServerContext) async throws -> Inference_ModelConfigResponse {
        let model = try model(request.name, version: request.version)
        func describe(_ spec: TensorSpec) -> (Inference_DataType, [Int64]) { (GRPCTensors.configType(spec.datatype), spec.shape.map(Int64.init)) }
        return .with {
            $0.config = .with { config in
                config.name = model.name
                config.platform = "sidecar_python"
                config.backend = "python"
                config.maxBatchSize = 0  // each request is one item; Sidecar batches requests itself
                config.input = model.configuration.inputs.map { spec in
                    .with { $0.name = spec.name; ($0.dataType, $0.dims) = describe(spec) }
                }
                config.output = model.configuration.outputs.map { spec in
                    .with { $0.name = spec.name; ($0.dataType, $0.dims) = describe(spec) }
                }
            }
        }
    }

    func modelInfer(request: Inference_ModelInferRequest, context: ServerContext) async throws -> Inference_ModelInferResponse {
        do {
            return try await infer(request)
        } catch let error as RPCError {
            throw error
        } catch {
            throw FrontError.from(error).rpcError
        }
    }

    /// ModelInfer with the request's metadata, for its gRPC deadline (`grpc-timeout`): items still
    /// queued when it passes are never dispatched. (grpc-swift also cancels the handler then.)
    func modelInfer(
        request: ServerRequest<Inference_ModelInferRequest>, context: ServerContext
    ) async throws -> ServerResponse<Inference_ModelInferResponse> {
        let start = ContinuousClock.now
        let timeout = Deadlines.timeout(grpc: request.metadata)
        do {
            let response = try await infer(request.message, start: start, grpcTimeout: timeout)
            var metadata: Metadata = [:]
            if case .stringParam(let reason)? = response.parameters["sidecar_fallback"]?.parameterChoice { metadata.addString(reason, forKey: "sidecar-fallback") }
            return ServerResponse(message: response, metadata: metadata)
        } catch let error as RPCError {
            throw error
        } catch is CancellationError where timeout.map({ ContinuousClock.now >= start.advanced(by: $0) }) == true {
            throw RPCError(code: .deadlineExceeded, message: "the request's gRPC deadline passed before it was answered")
        } catch {
            throw FrontError.from(error).rpcError
        }
    }

    /// Each request of the stream runs as soon as it arrives (so they batch with each other), and
    /// its response is written when it completes; a failed request gets `error_message` and the
    /// stream goes on.
    func modelStreamInfer(
        request: RPCAsyncSequence<Inference_ModelInferRequest, any Error>,
        response: RPCWriter<Inference_ModelStreamInferResponse>,
        context: ServerContext
    ) async throws {
        try await streamInfer(request.map { StreamItem.request($0) }, response: response)
    }

    /// A message of a `ModelStreamInfer` stream: a request to run, or one refused before it was
    /// decoded (``InferenceServiceRegistration``), answered in the stream with its error.
    enum StreamItem: Sendable {
        case request(Inference_ModelInferRequest)
        case refused(id: String, model: String, FrontError)
    }

    func streamInfer(
        _ items: some AsyncSequence<StreamItem, any Error> & Sendable, response: RPCWriter<Inference_ModelStreamInferResponse>
    ) async throws {
        let (responses, sink) = AsyncStream.makeStream(of: Inference_ModelStreamInferResponse.self)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for await message in responses { try await response.write(message) }
            }
            do {
                try await withThrowingTaskGroup(of: Void.self) { requests in
                    for try await item in items {
                        guard case .request(let inferRequest) = item else {
                            if case .refused(let id, let model, let error) = item {
                                sink.yield(.with {
                                    $0.errorMessage = error.message
                                    $0.inferResponse = .with { $0.id = id; $0.modelName = model }
                                })
                            }
                            continue
                        }
                        requests.addTask {
                            do {
                                let answer = try await infer(inferRequest)
                                sink.yield(.with { $0.inferResponse = answer })
                            } catch {
                                sink.yield(.with {
                                    $0.errorMessage = FrontError.from(error).message
                                    $0.inferResponse = .with { $0.id = inferRequest.id; $0.modelName = inferRequest.modelName }
                                })
                            }
                        }
                    }
                    try await requests.waitForAll()
                }
            } catch {
                sink.finish()
                throw error
            }
            sink.finish()
            try await group.waitForAll()
        }
    }

    /// The model a request's bytes name, asked whether it can take anything now; throws the
    /// refusal (RESOURCE_EXHAUSTED when it is overloaded) before the request is decoded. Bytes that
    /// cannot be peeked pass: their decode says what is wrong with them.
    func refuseEarly(_ raw: InferRequestBytes, since start: ContinuousClock.Instant) throws {
        guard let peek = InferRequestPeek(raw.bytes) else { return }
        do {
            try model(peek.model, version: peek.version, routingKey: peek.id).refuseEarly()
        } catch {
            let failure = FrontError.from(error)
            metrics.record(model: peek.model, protocol: "grpc", since: start, error: failure)
            throw failure.rpcError
        }
    }

    private func model(_ name: String, version: String, routingKey: String? = nil) throws -> Model {
        do {
            return try host.resolve(name, version: version, routingKey: routingKey.flatMap { $0.isEmpty ? nil : $0 })
        } catch {
            throw FrontError.from(error).rpcError
        }
    }

    private func infer(
        _ request: Inference_ModelInferRequest, start: ContinuousClock.Instant = .now, grpcTimeout: Duration? = nil
    ) async throws -> Inference_ModelInferResponse {
        do {
            let deadline = Deadlines.deadline(from: start, grpcTimeout, try Deadlines.timeout(request.parameters["timeout"]))
            let size = GRPCTensors.payloadBytes(of: request)
            guard size <= maxMessageBytes else {
                throw FrontError(.tooLarge, "the request's tensors hold \(size) bytes, over the limit of \(maxMessageBytes) (--max-grpc-message-bytes)")
            }
            let model = try model(request.modelName, version: request.modelVersion, routingKey: request.id)
            let inputs = try GRPCTensors.inputs(of: request)
            let served = try await model.serveInference(inputs, deadline: deadline)
            let outputs = served.value
            var selected = outputs
            if !request.outputs.isEmpty {
                selected = try request.outputs.map { wanted in
                    guard let tensor = outputs.first(where: { $0.name == wanted.name }) else {
                        throw FrontError(.invalidArgument, "requested output '\(wanted.name)' is not among the model's outputs (\(outputs.map(\.name).joined(separator: ", ")))")
                    }
                    return tensor
                }
            }
            metrics.record(model: request.modelName, protocol: "grpc", since: start, error: nil)
            return .with {
                $0.modelName = model.name
                $0.modelVersion = model.servedVersion
                $0.id = request.id
                $0.outputs = selected.map { tensor in
                    .with { $0.name = tensor.name; $0.datatype = tensor.datatype.rawValue; $0.shape = tensor.shape.map(Int64.init) }
                }
                $0.rawOutputContents = selected.map(\.data)
                if let fallback = served.fallback {
                    $0.parameters["sidecar_fallback"] = .with { $0.stringParam = fallback.reason.rawValue }
                    $0.parameters["sidecar_fallback_source"] = .with { $0.stringParam = fallback.source }
                }
            }
        } catch {
            // Named only once resolved: a client's made-up names must not grow the metrics.
            let resolved = (try? host.resolve(request.modelName, version: request.modelVersion)) != nil
            metrics.record(model: resolved ? request.modelName : FrontMetrics.unknownModel, protocol: "grpc", since: start, error: FrontError.from(error))
            throw error
        }
    }
}

/// Open Inference Protocol gRPC tensors ↔ ``Tensor``.
enum GRPCTensors {
    /// The request's inputs, from `raw_input_contents` (one entry per input, in order) or from each
    /// input's typed `contents`.
    static func inputs(of request: Inference_ModelInferRequest) throws -> [Tensor] {
        let raw = request.rawInputContents
        if !raw.isEmpty, raw.count != request.inputs.count {
            throw FrontError(
                .invalidArgument,
                "raw_input_contents has \(raw.count) entries for \(request.inputs.count) inputs; send one per input, in order")
        }
        return try request.inputs.enumerated().map { index, input in
            guard let datatype = TensorDataType(rawValue: input.datatype) else {
                throw FrontError(
                    .invalidArgument,
                    "input '\(input.name)': unknown datatype '\(input.datatype)'; expected one of \(TensorDataType.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            let data = raw.isEmpty ? try typed(input.contents, datatype, name: input.name) : raw[index]
            return Tensor(name: input.name, datatype: datatype, shape: input.shape.map { Int($0) }, data: data)
        }
    }

    /// The bytes a request's tensors occupy (raw contents, or typed contents at their element size).
    static func payloadBytes(of request: Inference_ModelInferRequest) -> Int {
        request.rawInputContents.reduce(0) { $0 + $1.count }
            + request.inputs.reduce(0) { total, input in
                let c = input.contents
                return total + c.boolContents.count + 4 * (c.intContents.count + c.uintContents.count + c.fp32Contents.count)
                    + 8 * (c.int64Contents.count + c.uint64Contents.count + c.fp64Contents.count)
                    + c.bytesContents.reduce(0) { $0 + 4 + $1.count }
            }
    }

    private static func typed(_ contents: Inference_InferTensorContents, _ datatype: TensorDataType, name: String) throws -> Data {
        var data = Data()
        func put<T: FixedWidthInteger>(_ values: [some BinaryInteger], as type: T.Type) throws {
            for value in values {
                guard let narrowed = T(exactly: value) else {
                    throw FrontError(.invalidArgument, "input '\(name)': \(value) does not fit \(datatype.rawValue)")
                }
                TensorJSON.append(narrowed, to: &data)
            }
        }
        switch datatype {
        case .bool: data = Data(contents.boolContents.map { $0 ? 1 : 0 })
        case .int8: try put(contents.intContents, as: Int8.self)
        case .int16: try put(contents.intContents, as: Int16.self)
        case .int32: try put(contents.intContents, as: Int32.self)
        case .int64: try put(contents.int64Contents, as: Int64.self)
        case .uint8: try put(contents.uintContents, as: UInt8.self)
        case .uint16: try put(contents.uintContents, as: UInt16.self)
        case .uint32: try put(contents.uintContents, as: UInt32.self)
        case .uint64: try put(contents.uint64Contents, as: UInt64.self)
        case .fp32: for value in contents.fp32Contents { TensorJSON.append(value.bitPattern, to: &data) }
        case .fp64: for value in contents.fp64Contents { TensorJSON.append(value.bitPattern, to: &data) }
        case .bytes: data = try Tensor.bytesData(contents.bytesContents)
        case .fp16:
            throw FrontError(.invalidArgument, "input '\(name)': FP16 has no typed contents field; send it in raw_input_contents")
        }
        return data
    }

    static func configType(_ datatype: TensorDataType) -> Inference_DataType {
        switch datatype {
        case .bool: return .typeBool
        case .uint8: return .typeUint8
        case .uint16: return .typeUint16
        case .uint32: return .typeUint32
        case .uint64: return .typeUint64
        case .int8: return .typeInt8
        case .int16: return .typeInt16
        case .int32: return .typeInt32
        case .int64: return .typeInt64
        case .fp16: return .typeFp16
        case .fp32: return .typeFp32
        case .fp64: return .typeFp64
        case .bytes: return .typeString
        }
    }
}
