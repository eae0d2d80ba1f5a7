import Foundation
import Sidecar

/// The Open Inference Protocol's HTTP/JSON inference request and response, with the binary tensor
/// data extension (the stock `tritonclient.http` uses it by default): the body is a JSON header,
/// `Inference-Header-Content-Length` bytes long, followed by the raw tensors that declared a
/// `binary_data_size`, in order.
enum HTTPInference {
    struct Request: Decodable {
        var id: String?
        var parameters: [String: JSONElement]?
        var inputs: [Input]
        var outputs: [RequestedOutput]?

        struct Input: Decodable {
            var name: String
            var shape: [Int]
            var datatype: String
            var parameters: [String: JSONElement]?
            var data: JSONElement?
            /// `data` already in raw form, when it was a flat array of the datatype's JSON type: the
            /// common case, decoded as `[Double]`/`[Int64]`/… without a value-by-value type probe.
            var rawData: Data?

            enum CodingKeys: String, CodingKey { case name, shape, datatype, parameters, data }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                name = try container.decode(String.self, forKey: .name)
                shape = try container.decode([Int].self, forKey: .shape)
                datatype = try container.decode(String.self, forKey: .datatype)
                parameters = try container.decodeIfPresent([String: JSONElement].self, forKey: .parameters)
                guard container.contains(.data) else { return }
                if let type = TensorDataType(rawValue: datatype), let raw = Self.flat(container, type) {
                    rawData = raw
                } else {
                    data = try container.decode(JSONElement.self, forKey: .data)
                }
            }

            private static func flat(_ container: KeyedDecodingContainer<CodingKeys>, _ type: TensorDataType) -> Data? {
                var raw = Data()
                switch type {
                case .fp32:
                    guard let values = try? container.decode([Float].self, forKey: .data) else { return nil }
                    raw.reserveCapacity(values.count * 4)
                    for v in values { TensorJSON.append(v.bitPattern, to: &raw) }
                case .fp64:
                    guard let values = try? container.decode([Double].self, forKey: .data) else { return nil }
                    raw.reserveCapacity(values.count * 8)
                    for v in values { TensorJSON.append(v.bitPattern, to: &raw) }
                case .int64:
                    guard let values = try? container.decode([Int64].self, forKey: .data) else { return nil }
                    for v in values { TensorJSON.append(v, to: &raw) }
                case .int32:
                    guard let values = try? container.decode([Int32].self, forKey: .data) else { return nil }
                    for v in values { TensorJSON.append(v, to: &raw) }
                case .bytes:
                    guard let values = try? container.decode([String].self, forKey: .data) else { return nil }
                    guard let encoded = try? Tensor.bytesData(values.map { Data($0.utf8) }) else { return nil }  // the general path says why
                    raw = encoded
                default:
                    return nil  // the general path checks ranges and types value by value
                }
                return raw
            }
        }

        struct RequestedOutput: Decodable {
            var name: String
            var parameters: [String: JSONElement]?
        }
    }

    /// A decoded request: the input tensors and how the client wants the outputs.
    struct Decoded {
        var id: String?
        var inputs: [Tensor]
        /// Outputs the client asked for, by name (nil: all), and whether each comes back as binary.
        var requested: [(name: String, binary: Bool)]?
        var binaryByDefault: Bool
        /// The request's `timeout` parameter (µs), reserved by the Open Inference Protocol.
        var timeout: Duration?
    }

    /// The `Inference-Header-Content-Length` header: the JSON header's length in bytes.
    static func headerLength(_ value: String?) throws -> Int? {
        guard let value else { return nil }
        guard let length = Int(value.trimmingCharacters(in: .whitespaces)), length >= 0 else {
            throw FrontError(.invalidArgument, "Inference-Header-Content-Length must be a non-negative integer, got '\(value.prefix(40))'")
        }
        return length
    }

    static func decode(_ body: Data, headerLength: Int?) throws -> Decoded {
        let json: Data
        var binary = Data()
        if let headerLength {
            guard headerLength >= 0, headerLength <= body.count else {
                throw FrontError(
                    .invalidArgument,
                    "Inference-Header-Content-Length is \(headerLength) but the body has only \(body.count) bytes")
            }
            json = body.prefix(headerLength)
            binary = body.dropFirst(headerLength)
        } else {
            json = body
        }
        let request: Request
        do {
            request = try JSONDecoder().decode(Request.self, from: json)
        } catch {
            throw FrontError.from(error)
        }
        var offset = binary.startIndex
        var inputs: [Tensor] = []
        for input in request.inputs {
            guard let datatype = TensorDataType(rawValue: input.datatype) else {
                throw FrontError(
                    .invalidArgument,
                    "input '\(input.name)': unknown datatype '\(input.datatype)'; expected one of \(TensorDataType.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            let data: Data
            if let size = input.parameters?["binary_data_size"] {
                guard let size = size.intValue, size >= 0 else {
                    throw FrontError(.invalidArgument, "input '\(input.name)': parameters.binary_data_size must be a non-negative integer")
                }
                guard binary.endIndex - offset >= size else {
                    throw FrontError(
                        .invalidArgument,
                        "input '\(input.name)': binary_data_size is \(size) but only \(binary.endIndex - offset) binary bytes remain after the JSON header")
                }
                if datatype.elementSize != nil {
                    let shaped = Tensor(name: input.name, datatype: datatype, shape: input.shape, data: Data())
                    guard let needed = shaped.expectedByteCount else {
                        throw FrontError(
                            .invalidArgument,
                            "input '\(input.name)': shape \(Tensor.describe(input.shape)) of \(datatype.rawValue) has a negative dimension or claims more bytes than any request can hold; binary_data_size is \(size)")
                    }
                    guard size == needed else {
                        throw FrontError(
                            .invalidArgument,
                            "input '\(input.name)': binary_data_size is \(size) but shape \(Tensor.describe(input.shape)) of \(datatype.rawValue) needs \(needed) bytes")
                    }
                }
                data = binary[offset..<(offset + size)]
                offset += size
            } else if let raw = input.rawData {
                data = raw
            } else if let values = input.data {
                data = try TensorJSON.data(from: values, datatype: datatype, name: input.name)
            } else {
                throw FrontError(.invalidArgument, "input '\(input.name)' has neither data nor a binary_data_size parameter")
            }
            inputs.append(Tensor(name: input.name, datatype: datatype, shape: input.shape, data: data))
        }
        if offset != binary.endIndex {
            throw FrontError(
                .invalidArgument,
                "the body has \(binary.endIndex - offset) binary bytes that no input's binary_data_size accounts for")
        }
        let binaryByDefault = request.parameters?["binary_data_output"]?.boolValue ?? false
        let requested = request.outputs?.map { output in
            (output.name, output.parameters?["binary_data"]?.boolValue ?? binaryByDefault)
        }
        return Decoded(
            id: request.id, inputs: inputs, requested: requested, binaryByDefault: binaryByDefault,
            timeout: try Deadlines.timeout(microseconds: request.parameters?["timeout"]))
    }

    /// The response body, and the JSON header's length when binary outputs follow it. The JSON is
    /// written directly: it is small and fixed in shape, and Codable was a third of the request path.
    static func encode(
        _ outputs: [Tensor], for request: Decoded, model: String, version: String = "1", fallback: FallbackUse? = nil
    ) throws -> (body: Data, headerLength: Int?) {
        var selected: [(Tensor, Bool)] = []
        if let requested = request.requested {
            for (name, binary) in requested {
                guard let tensor = outputs.first(where: { $0.name == name }) else {
                    throw FrontError(
                        .invalidArgument,
                        "requested output '\(name)' is not among the model's outputs (\(outputs.map(\.name).joined(separator: ", ")))")
                }
                selected.append((tensor, binary))
            }
        } else {
            selected = outputs.map { ($0, request.binaryByDefault) }
        }
        var json = JSONWriter()
        json.raw(#"{"model_name":"#)
        json.string(model)
        json.raw(#","model_version":"#)
        json.string(version)
        if let id = request.id {
            json.raw(#","id":"#)
            json.string(id)
        }
        if let fallback {
            // Which answers are stand-ins, where a client reads the response's own parameters.
            json.raw(#","parameters":{"sidecar_fallback":"#)
            json.string(fallback.reason.rawValue)
            json.raw(#","sidecar_fallback_source":"#)
            json.string(fallback.source)
            json.raw("}")
        }
        json.raw(#","outputs":["#)
        var binaryTail = Data()
        for (index, (tensor, binary)) in selected.enumerated() {
            if index > 0 { json.raw(",") }
            json.raw(#"{"name":"#)
            json.string(tensor.name)
            json.raw(#","datatype":""# + tensor.datatype.rawValue + #"","shape":["#)
            json.raw(tensor.shape.map(String.init).joined(separator: ","))
            json.raw("]")
            if binary {
                binaryTail.append(tensor.data)
                json.raw(#","parameters":{"binary_data_size":\#(tensor.data.count)}}"#)
            } else {
                json.raw(#","data":["#)
                for (i, element) in TensorJSON.json(from: tensor).enumerated() {
                    if i > 0 { json.raw(",") }
                    json.element(element)
                }
                json.raw("]}")
            }
        }
        json.raw("]}")
        if binaryTail.isEmpty { return (json.data, nil) }
        return (json.data + binaryTail, json.data.count)
    }
}

/// Appends JSON text to a buffer.
struct JSONWriter {
    var data = Data()

    mutating func raw(_ text: String) { data.append(contentsOf: text.utf8) }

    mutating func string(_ text: String) {
        data.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): data.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): data.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0x0A: data.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: data.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: data.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case ..<0x20: data.append(contentsOf: Array(String(format: "\\u%04x", byte).utf8))
            default: data.append(byte)
            }
        }
        data.append(UInt8(ascii: "\""))
    }

    mutating func element(_ value: JSONElement) {
        switch value {
        case .null: raw("null")
        case .bool(let v): raw(v ? "true" : "false")
        case .integer(let v): raw(String(v))
        case .unsigned(let v): raw(String(v))
        // JSON has no NaN or infinity; they become null, as Python's json and orjson do.
        case .number(let v): raw(v.isFinite ? (v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : "\(v)") : "null")
        case .string(let v): string(v)
        case .array(let items):
            raw("[")
            for (i, item) in items.enumerated() {
                if i > 0 { raw(",") }
                element(item)
            }
            raw("]")
        case .object(let fields):
            raw("{")
            for (i, (key, item)) in fields.sorted(by: { $0.key < $1.key }).enumerated() {
                if i > 0 { raw(",") }
                string(key)
                raw(":")
                element(item)
            }
            raw("}")
        }
    }
}
