import GRPCCore
import GRPCProtobuf
import Sidecar
import SidecarOIPProtocol

/// `ModelInfer` and `ModelStreamInfer` registered so that an overloaded model's requests are
/// refused before their tensors are decoded.
///
/// The generated registration decodes every message before the handler sees it, which under an
/// overload is most of what a refusal costs. Here those two methods take the message's bytes, read
/// only the model's name, version and the request id (``InferRequestPeek``), ask the model whether
/// it can take anything at all (``Model/refuseEarly()``), and decode the rest only then. Every
/// other method keeps the generated registration.
struct InferenceServiceRegistration: RegistrableRPCService {
    let service: InferenceService

    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        service.registerMethods(with: &router)
        router.registerHandler(
            forMethod: Inference_GRPCInferenceService.Method.ModelInfer.descriptor,
            deserializer: InferRequestBytes.Deserializer(),
            serializer: ProtobufSerializer<Inference_ModelInferResponse>(),
            handler: { request, context in
                let key = try service.authenticate(request.metadata)
                // A message that never finishes arriving is reset by its stream's clock (StreamClock).
                let single = try await ServerRequest(stream: request)
                let start = ContinuousClock.now
                try service.admit(key, single.message, since: start)
                try service.refuseEarly(single.message, since: start)
                let decoded = try single.message.decoded()
                let response = try await service.modelInfer(
                    request: ServerRequest(metadata: single.metadata, message: decoded), context: context)
                return StreamingServerResponse(single: response)
            })
        router.registerHandler(
            forMethod: Inference_GRPCInferenceService.Method.ModelStreamInfer.descriptor,
            deserializer: InferRequestBytes.Deserializer(),
            serializer: ProtobufSerializer<Inference_ModelStreamInferResponse>(),
            handler: { request, context in
                let key = try service.authenticate(request.metadata)
                return StreamingServerResponse(metadata: [:]) { writer in
                    let messages = request.messages.map { raw -> InferenceService.StreamItem in
                        do {
                            try service.admit(key, raw, since: .now)
                            try service.refuseEarly(raw, since: .now)
                            return .request(try raw.decoded())
                        } catch {
                            let peek = InferRequestPeek(raw.bytes)
                            return .refused(id: peek?.id ?? "", model: peek?.model ?? "", FrontError.from(error))
                        }
                    }
                    try await service.streamInfer(messages, response: writer)
                    return [:]
                }
            })
    }
}

/// A `ModelInferRequest` as it came off the wire.
struct InferRequestBytes: Sendable {
    let bytes: [UInt8]

    struct Deserializer: MessageDeserializer {
        func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> InferRequestBytes {
            InferRequestBytes(bytes: serializedMessageBytes.withUnsafeBytes { Array($0) })
        }
    }

    func decoded() throws -> Inference_ModelInferRequest {
        do {
            return try Inference_ModelInferRequest(serializedBytes: bytes)
        } catch {
            throw RPCError(code: .invalidArgument, message: "the ModelInferRequest could not be decoded: \(error)")
        }
    }
}

/// The three strings at the top of a `ModelInferRequest` (`model_name` = 1, `model_version` = 2,
/// `id` = 3), read from its wire format without decoding the rest: every other field is skipped by
/// its length. Nil when the bytes are not a well-formed message at its top level; the full decode
/// then says what is wrong.
struct InferRequestPeek: Equatable {
    var model = ""
    var version = ""
    var id = ""

    init?(_ bytes: [UInt8]) {
        var i = 0
        func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while i < bytes.count, shift < 64 {
                let byte = bytes[i]
                i += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while i < bytes.count {
            guard let key = varint() else { return nil }
            let field = key >> 3
            switch key & 7 {
            case 0:
                guard varint() != nil else { return nil }
            case 1:
                guard bytes.count - i >= 8 else { return nil }
                i += 8
            case 5:
                guard bytes.count - i >= 4 else { return nil }
                i += 4
            case 2:
                guard let length = varint(), length <= UInt64(bytes.count - i) else { return nil }
                let range = i..<(i + Int(length))
                i = range.upperBound
                guard (1...3).contains(field) else { continue }
                guard let text = String(validating: bytes[range], as: UTF8.self) else { return nil }
                if field == 1 { model = text } else if field == 2 { version = text } else { id = text }
            default:
                return nil
            }
        }
    }

    init(model: String, version: String, id: String) {
        (self.model, self.version, self.id) = (model, version, id)
    }
}
