import Foundation
import GRPCCore
import Sidecar
import Testing
@testable import SidecarFront

@Suite struct CodecTests {
    func decode(_ json: String, binary: Data = Data()) throws -> HTTPInference.Decoded {
        let header = Data(json.utf8)
        return try HTTPInference.decode(header + binary, headerLength: binary.isEmpty ? nil : header.count)
    }

    @Test func jsonDataOfEveryDatatype() throws {
        let request = try decode("""
            {"inputs": [
              {"name": "f", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [-3, 4]]},
              {"name": "d", "shape": [1], "datatype": "FP64", "data": [0.1]},
              {"name": "i", "shape": [3], "datatype": "INT64", "data": [1, -2, 9007199254740993]},
              {"name": "u", "shape": [2], "datatype": "UINT8", "data": [0, 255]},
              {"name": "b", "shape": [2], "datatype": "BOOL", "data": [true, false]},
              {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["hé", ""]},
              {"name": "h", "shape": [1], "datatype": "FP16", "data": [1.5]}
            ]}
            """)
        let byName = Dictionary(uniqueKeysWithValues: request.inputs.map { ($0.name, $0) })
        for tensor in request.inputs { try tensor.validate() }
        #expect(TensorJSON.json(from: byName["f"]!) == [.number(1), .number(2.5), .number(-3), .number(4)])
        #expect(TensorJSON.json(from: byName["i"]!) == [.integer(1), .integer(-2), .integer(9_007_199_254_740_993)])
        #expect(TensorJSON.json(from: byName["u"]!) == [.integer(0), .integer(255)])
        #expect(TensorJSON.json(from: byName["b"]!) == [.bool(true), .bool(false)])
        #expect(TensorJSON.json(from: byName["s"]!) == [.string("hé"), .string("")])
        #expect(TensorJSON.json(from: byName["h"]!) == [.number(1.5)])
        #expect(byName["d"]!.data.count == 8)
    }

    @Test(arguments: [
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}"#, "data[0] must be an integer in range for INT8"),
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}"#, "data[0] must be true or false"),
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}"#, "data[0] must be a number for FP32"),
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}"#, "data[0] must be a string for BYTES"),
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}"#, "unknown datatype 'FP99'"),
        (#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}"#, "neither data nor a binary_data_size"),
        (#"{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}"#, "missing field 'shape' in inputs[0]"),
        (#"{"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]}"#, "'inputs[0].shape' must be"),
        (#"{"inputs": 5}"#, "'inputs' must be a list"),
        (#"{"inputs": [oops"#, "the body is not valid JSON"),
    ])
    func malformedRequestsNameTheField(json: String, message: String) {
        let error = #expect(throws: FrontError.self) { try decode(json) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains(message) == true, "\(error?.message ?? "") should contain \(message)")
    }

    @Test func binaryInputsAndOutputs() throws {
        var raw = Data()
        for v: Float in [1, 2, 3] { withUnsafeBytes(of: v.bitPattern.littleEndian) { raw.append(contentsOf: $0) } }
        let request = try decode(
            #"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}], "outputs": [{"name": "x", "parameters": {"binary_data": true}}]}"#,
            binary: raw)
        #expect(request.inputs[0].data == raw)
        let (body, headerLength) = try HTTPInference.encode(request.inputs, for: request, model: "m")
        let length = try #require(headerLength)
        #expect(body.suffix(from: body.startIndex + length) == raw)
        let header = try JSONSerialization.jsonObject(with: body.prefix(length)) as! [String: Any]
        let output = (header["outputs"] as! [[String: Any]])[0]
        #expect((output["parameters"] as! [String: Any])["binary_data_size"] as? Int == 12)
        #expect(output["data"] == nil)
    }

    @Test func binarySizesMustAddUp() {
        let short = #expect(throws: FrontError.self) {
            try decode(#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}"#, binary: Data(count: 8))
        }
        #expect(short?.message.contains("binary_data_size is 12 but only 8 binary bytes remain") == true)
        let extra = #expect(throws: FrontError.self) {
            try decode(#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}"#, binary: Data(count: 8))
        }
        #expect(extra?.message.contains("4 binary bytes that no input") == true)
        let header = #expect(throws: FrontError.self) { try HTTPInference.decode(Data("{}".utf8), headerLength: 10) }
        #expect(header?.message.contains("Inference-Header-Content-Length is 10") == true)
    }

    @Test func grpcTimeoutHeaderUnits() {
        func timeout(_ text: String) -> Duration? {
            var metadata = Metadata()
            metadata.addString(text, forKey: "grpc-timeout")
            return Deadlines.timeout(grpc: metadata)
        }
        #expect(timeout("100m") == .milliseconds(100))
        #expect(timeout("2S") == .seconds(2))
        #expect(timeout("1M") == .seconds(60))
        #expect(timeout("250u") == .microseconds(250))
        #expect(timeout("soon") == nil)
        #expect(timeout("5x") == nil)
        #expect(Deadlines.timeout(grpc: Metadata()) == nil)
    }

    @Test func errorsMapToStatusAndCode() {
        let cases: [(any Error, Int, String)] = [
            (SidecarError(.notFound, "x"), 404, "notFound"),
            (SidecarError(.invalidInput, "x"), 400, "invalidArgument"),
            (SidecarError(.queueFull, "x"), 429, "resourceExhausted"),
            (SidecarError(.unavailable, "x"), 503, "unavailable"),
            (PredictionError(kind: .handlerError, type: "ValueError", message: "bad"), 500, "internalError"),
            (FrontError(.tooLarge, "x"), 413, "resourceExhausted"),
        ]
        for (error, status, code) in cases {
            let mapped = FrontError.from(error)
            #expect(mapped.status.code == status)
            #expect("\(mapped.rpcCode)" == code)
        }
        #expect(FrontError.from(PredictionError(kind: .handlerError, type: "ValueError", message: "bad")).message == "ValueError: bad")
        // gRPC errors raised inside the services keep their code (metrics label them by it).
        #expect(FrontError.from(RPCError(code: .invalidArgument, message: "x")).metricLabel == "invalid_argument")
        #expect(FrontError.from(RPCError(code: .notFound, message: "x")).metricLabel == "not_found")
    }
}

@Suite struct ServerConfigurationFileTests {
    /// Config/sidecar.yaml documents every server key at its default: it must parse to the defaults.
    @Test func referenceFileParsesToTheDefaults() throws {
        let parsed = try ServerConfigurationFile.read(FrontFixtures.packageRoot.appendingPathComponent("Config/sidecar.yaml").path)
        let defaults = ServerConfiguration()
        #expect(parsed.models == defaults.models)
        #expect(parsed.host == defaults.host)
        #expect(parsed.httpPort == defaults.httpPort)
        #expect(parsed.grpcPort == defaults.grpcPort)
        #expect(parsed.maxBodyBytes == defaults.maxBodyBytes)
        #expect(parsed.maxGRPCMessageBytes == defaults.maxGRPCMessageBytes)
        #expect(parsed.adminHost == defaults.adminHost)
        #expect(parsed.adminPort == defaults.adminPort)
        #expect(parsed.adminToken == nil)
        #expect(parsed.bundleMaxBytes == defaults.bundleMaxBytes)
    }

    @Test func unknownKeyAndRelativeModels() throws {
        let dir = try FrontFixtures.model(["server.yaml": "models: [a, /abs/b]\nhttp_port: 9000\n", "bad.yaml": "http_prot: 1\n"])
        let parsed = try ServerConfigurationFile.read(dir.appendingPathComponent("server.yaml").path)
        #expect(parsed.models == [dir.appendingPathComponent("a").path, "/abs/b"])
        #expect(parsed.httpPort == 9000)
        let error = #expect(throws: SidecarError.self) { try ServerConfigurationFile.read(dir.appendingPathComponent("bad.yaml").path) }
        #expect(error?.message.contains("unknown key 'http_prot'") == true)
    }
}
