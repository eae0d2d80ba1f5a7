import Foundation
import Testing
@testable import Sidecar

func fp32(_ name: String, _ values: [Float], shape: [Int]? = nil) -> Tensor {
    var data = Data()
    for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) } }
    return Tensor(name: name, datatype: .fp32, shape: shape ?? [values.count], data: data)
}

func floats(_ tensor: Tensor) -> [Float] {
    stride(from: 0, to: tensor.data.count, by: 4).map { offset in
        let start = tensor.data.startIndex + offset
        let bits = (0..<4).reduce(UInt32(0)) { $0 | UInt32(tensor.data[start + $1]) << (8 * $1) }
        return Float(bitPattern: bits)
    }
}

/// Open Inference Protocol items through real workers: tensors in, numpy in the handler, tensors out.
@Suite(.serialized) struct TensorTests {
    static let files = [
        "handler.py": """
            import numpy as np

            def predict(batch):
                return [{"doubled": item["x"] * 2, "label": np.array([b"ok", "é"], dtype=object)} for item in batch]
            """,
        "requirements.txt": "numpy\n",
        "sidecar.yaml": """
            inputs:
              - {name: x, datatype: FP32, shape: [-1]}
            outputs:
              - {name: doubled, datatype: FP32, shape: [-1]}
              - {name: label, datatype: BYTES, shape: [2]}
            """,
    ]

    @Test func tensorsRoundTripThroughTheHandler() async throws {
        let dir = try Fixtures.model(Self.files)
        try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
            let outputs = try await model.infer([fp32("x", [1, 2.5, -3])])
            let doubled = try #require(outputs.first { $0.name == "doubled" })
            #expect(doubled.datatype == .fp32)
            #expect(doubled.shape == [3])
            #expect(floats(doubled) == [2, 5, -6])
            let label = try #require(outputs.first { $0.name == "label" })
            #expect(label.datatype == .bytes)
            #expect(label.data == (try Tensor.bytesData([Data("ok".utf8), Data("é".utf8)])))

            // Concurrent requests share batches and each gets its own answer.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in 0..<50 {
                    group.addTask {
                        let out = try await model.infer([fp32("x", [Float(n)])])
                        #expect(floats(out.first { $0.name == "doubled" }!) == [Float(2 * n)])
                    }
                }
                try await group.waitForAll()
            }
        }
    }

    @Test func requestsThatDoNotMatchAreRejectedBeforePython() async throws {
        let dir = try Fixtures.model(Self.files)
        try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
            let cases: [([Tensor], String)] = [
                ([], "lacks input 'x'"),
                ([fp32("y", [1])], "has no input 'y'"),
                ([Tensor(name: "x", datatype: .int32, shape: [1], data: Data(count: 4))], "must be FP32, got INT32"),
                ([fp32("x", [1, 2], shape: [1, 2])], "must have shape [-1]"),
                ([fp32("x", [1, 2], shape: [3])], "needs 12 bytes"),
                ([fp32("x", [1]), fp32("x", [1])], "appears twice"),
            ]
            for (inputs, message) in cases {
                let error = await #expect(throws: SidecarError.self) { try await model.infer(inputs) }
                #expect(error?.code == .invalidInput)
                #expect(error?.message.contains(message) == true, "\(error?.message ?? "") should contain \(message)")
            }
            #expect(model.batchStatistics.items == 0, "nothing reached a worker")
        }
    }

    @Test func singleArrayOutputIsNamedAfterTheDeclaredOutput() async throws {
        let dir = try Fixtures.model([
            "handler.py": "def predict(batch):\n    return [item['x'].sum() for item in batch]\n",
            "requirements.txt": "numpy\n",
            "sidecar.yaml": "outputs:\n  - {name: total, datatype: FP32, shape: []}\n",
        ])
        try await withModel(at: dir.path, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
            let outputs = try await model.infer([fp32("x", [1, 2, 3])])
            #expect(outputs.map(\.name) == ["total"])
            #expect(floats(outputs[0]) == [6])
        }
    }

    @Test func bytesLayoutIsChecked() throws {
        #expect(throws: SidecarError.self) {
            try Tensor(name: "s", datatype: .bytes, shape: [1], data: Data([5, 0, 0, 0, 65])).validate()
        }
        try Tensor(name: "s", datatype: .bytes, shape: [2], data: try Tensor.bytesData([Data("a".utf8), Data()])).validate()
    }
}
