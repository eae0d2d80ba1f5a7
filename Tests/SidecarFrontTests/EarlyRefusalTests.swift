import Foundation
import SidecarOIPProtocol
import SwiftProtobuf
import Testing
@testable import SidecarFront

/// The two looks the fronts take at a request before decoding it: the HTTP path's model, and a
/// gRPC ModelInferRequest's name, version and id from its wire format.
@Suite struct EarlyRefusalTests {
    @Test func inferencePathsNameTheirModelAndNothingElseIsLookedAt() {
        func target(_ path: String) -> String? {
            EarlyRefusalHandler.inferenceTarget(path).map { "\($0.model)|\($0.version ?? "-")|\($0.protocol)" }
        }
        #expect(target("/v2/models/slow/infer") == "slow|-|http")
        #expect(target("/v2/models/slow/infer?x=1") == "slow|-|http")
        #expect(target("/v2/models/slow/versions/3/infer") == "slow|3|http")
        #expect(target("/v1/models/iris:predict") == "iris|-|kserve_v1")
        for other in ["/v2/models/slow", "/v2/models/slow/ready", "/v2/models//infer", "/v2/models/a/versions//infer", "/v1/models/:predict",
            "/v2/models/sl%6Fw/infer", "/metrics", "/", "", "/v2/models/slow/infer/x", "v2/models/slow/infer"]
        {
            #expect(target(other) == nil, "\(other)")
        }
    }

    @Test func peekReadsNameVersionAndIDWithoutDecodingTheTensors() throws {
        let request = Inference_ModelInferRequest.with {
            $0.modelName = "echo"
            $0.modelVersion = "2"
            $0.id = "r-1"
            $0.parameters["timeout"] = .with { $0.int64Param = 5 }
            $0.inputs = [.with { $0.name = "x"; $0.datatype = "FP32"; $0.shape = [1, 4] }]
            $0.rawInputContents = [Data(repeating: 7, count: 1000)]
        }
        let bytes: [UInt8] = try request.serializedBytes()
        #expect(InferRequestPeek(bytes) == InferRequestPeek(model: "echo", version: "2", id: "r-1"))
        #expect(InferRequestPeek([]) == InferRequestPeek(model: "", version: "", id: ""))
        // Cut anywhere inside a field, the bytes are not a message: nil, and the decode says why.
        #expect(InferRequestPeek(Array(bytes.prefix(bytes.count - 1))) == nil)
        #expect(InferRequestPeek([0x0A, 0x05, 0x61]) == nil)  // a name of 5 bytes with 1 present
        #expect(InferRequestPeek([0x0A, 0x02, 0xFF, 0xFE]) == nil)  // not UTF-8
        #expect(InferRequestPeek([0x0B]) == nil)  // wire type 3 (groups) is not in this message
        #expect(InferRequestPeek([0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) == nil)  // a varint past 64 bits
    }
}
