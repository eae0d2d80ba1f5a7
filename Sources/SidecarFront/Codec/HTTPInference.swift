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
                if let element = datatype.elementSize {
                    let needed = input.shape.reduce(1, *) * element
                    guard size == needed else {
                        throw FrontError(
                            .invalidArgument,
                            "input '\(input.name)': binary_data_size is \(size) but shape \(input.shape) of \(datatype.rawValue) needs \(needed) bytes")
                    }
                }
                data = binary[offset..<(offset + size)]
                offset += size
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
        return Decoded(id: request.id, inputs: inputs, requested: requested, binaryByDefault: binaryByDefault)
    }

    struct Response: Encodable {
        var model_name: String
        var model_version: String
        var id: String?
        var outputs: [Output]

        struct Output: Encodable {
            var name: String
            var datatype: String
            var shape: [Int]
            var parameters: [String: JSONElement]?
            var data: [JSONElement]?
        }
    }

    /// The response body, and the JSON header's length when binary outputs follow it.
    static func encode(_ outputs: [Tensor], for request: Decoded, model: String) throws -> (body: Data, headerLength: Int?) {
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
        var binaryTail = Data()
        let encoded = selected.map { tensor, binary -> Response.Output in
            if binary {
                binaryTail.append(tensor.data)
                return .init(
                    name: tensor.name, datatype: tensor.datatype.rawValue, shape: tensor.shape,
                    parameters: ["binary_data_size": .integer(Int64(tensor.data.count))], data: nil)
            }
            return .init(name: tensor.name, datatype: tensor.datatype.rawValue, shape: tensor.shape, parameters: nil, data: TensorJSON.json(from: tensor))
        }
        let header = try JSONEncoder().encode(Response(model_name: model, model_version: "1", id: request.id, outputs: encoded))
        if binaryTail.isEmpty { return (header, nil) }
        return (header + binaryTail, header.count)
    }
}
