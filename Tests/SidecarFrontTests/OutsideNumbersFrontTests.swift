import Foundation
import GRPCCore
import Sidecar
import SidecarOIPProtocol
import Testing
@testable import SidecarFront

/// The front's decoders on numbers that used to trap the server: each case crashed the test
/// process before the fix (checked arithmetic), and is now a 400 / INVALID_ARGUMENT naming the field.
@Suite struct OutsideNumbersFrontTests {
    @Test func binarySizeCheckOnAnOverflowingShape() throws {
        let header = Data(#"{"inputs": [{"name": "x", "shape": [99999999999, 99999999999], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}"#.utf8)
        let error = #expect(throws: FrontError.self) {
            try HTTPInference.decode(header + Data(count: 8), headerLength: header.count)
        }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("claims more bytes than any request can hold") == true)
    }

    @Test func headerLengthMustBeANonNegativeInteger() throws {
        #expect(try HTTPInference.headerLength(nil) == nil)
        #expect(try HTTPInference.headerLength("12") == 12)
        for bad in ["-1", "1e3", "99999999999999999999", "", "ten"] {
            #expect(throws: FrontError.self) { try HTTPInference.headerLength(bad) }
        }
        #expect(throws: FrontError.self) { try HTTPInference.decode(Data("{}".utf8), headerLength: Int.max) }
    }

    @Test func hugeTimeoutsAreClampedNotTrapped() throws {
        #expect(try Deadlines.timeout(header: "1e300") == .longestTimeout)
        #expect(try Deadlines.timeout(header: "9223372036854775807") == .longestTimeout)
        #expect(throws: FrontError.self) { try Deadlines.timeout(header: "nan") }
        #expect(throws: FrontError.self) { try Deadlines.timeout(header: "inf") }
        #expect(throws: FrontError.self) { try Deadlines.timeout(header: "-5") }
        #expect(try Deadlines.timeout(microseconds: .number(1e300)) == .longestTimeout)
        #expect(try Deadlines.timeout(microseconds: .unsigned(UInt64.max)) == .longestTimeout)
        #expect(throws: FrontError.self) { try Deadlines.timeout(microseconds: .integer(-1)) }
        let parameter = Inference_InferParameter.with { $0.doubleParam = 1e300 }
        #expect(try Deadlines.timeout(parameter) == .longestTimeout)

        func grpc(_ text: String) -> Duration? {
            var metadata = Metadata()
            metadata.addString(text, forKey: "grpc-timeout")
            return Deadlines.timeout(grpc: metadata)
        }
        #expect(grpc("99999999H") == .longestTimeout)
        #expect(grpc("9223372036854775807H") == nil)  // more than 8 digits: not a grpc-timeout
        #expect(grpc("-5S") == nil)
        #expect(grpc("+5S") == nil)
        #expect(grpc("99999999n") == .nanoseconds(99_999_999))
    }

    @Test func kserveInstancesAreDecodedOrRefused() throws {
        #expect(try KServeV1.items(from: Data(#"{"instances": [1, [2, 3], {"a": null}]}"#.utf8)).count == 3)
        #expect(throws: FrontError.self) { try KServeV1.items(from: Data(#"{"instances": 5}"#.utf8)) }
        #expect(throws: FrontError.self) { try KServeV1.items(from: Data(#"{"instances": [1e400]}"#.utf8)) }
    }

    @Test func adminBodiesAreCheckedBeforeUse() throws {
        #expect(try AdminScaleRequest.decode(Data(#"{"workers": 2, "timeout_s": 1e300}"#.utf8)).timeout == .longestTimeout)
        #expect(throws: FrontError.self) { try AdminScaleRequest.decode(Data(#"{"workers": 2, "timeout_s": 1e400}"#.utf8)) }
        #expect(try AdminScaleRequest.decode(Data(#"{"workers": 2, "timeout_s": 1e30}"#.utf8)).timeout == .longestTimeout)
        #expect(throws: FrontError.self) { try AdminScaleRequest.decode(Data(#"{"workers": 2, "timeout_s": -1}"#.utf8)) }
        #expect(throws: FrontError.self) { try AdminScaleRequest.decode(Data(#"{"workers": 100000}"#.utf8)) }
        #expect(throws: FrontError.self) { try AdminLoadRequest.decode(Data(#"{"directory": "/m", "workers": 1000000}"#.utf8)) }
        #expect(throws: FrontError.self) { try AdminLoadRequest.decode(Data(#"{"directory": "/m", "name": "../../etc"}"#.utf8)) }
        #expect(try AdminLoadRequest.decode(Data(#"{"directory": "/m", "name": "ok-2", "workers": 3}"#.utf8)).workers == 3)
    }

    @Test func grpcStatusMessagesStayUnderTheTrailerLimit() {
        let long = FrontError(.notFound, "no model named '\(String(repeating: "é", count: 50_000))'").rpcError
        #expect(long.message.utf8.count < 4200)
        #expect(long.message.hasSuffix("bytes in all)"))
        #expect(FrontError(.notFound, "short").rpcError.message == "short")
    }

    @Test func grpcOverflowingShapeIsRefused() throws {
        let request = Inference_ModelInferRequest.with {
            $0.modelName = "m"
            $0.inputs = [.with { $0.name = "x"; $0.datatype = "FP32"; $0.shape = [Int64.max, Int64.max] }]
            $0.rawInputContents = [Data(count: 8)]
        }
        let inputs = try GRPCTensors.inputs(of: request)
        #expect(throws: SidecarError.self) { try inputs[0].validate() }
    }
}
