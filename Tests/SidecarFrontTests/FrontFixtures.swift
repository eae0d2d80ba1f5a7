import Foundation
import Logging
import Sidecar

enum FrontFixtures {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var hostOptions: HostOptions {
        let cache = ProcessInfo.processInfo.environment["SIDECAR_TEST_CACHE_DIR"].map { URL(fileURLWithPath: $0) }
            ?? packageRoot.appendingPathComponent(".build/test-cache")
        return HostOptions(environment: EnvironmentOptions(cacheDirectory: cache))
    }

    static var logger: Logger {
        var logger = Logger(label: "sidecar-front-test") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .warning
        return logger
    }

    /// A model with declared inputs, tensor outputs, and a failure on negative input.
    static func typedModel() throws -> URL {
        try model([
            "handler.py": """
                import numpy as np

                def predict(batch):
                    if any((item["x"] < 0).any() for item in batch):
                        raise ValueError("negative input")
                    return [{"doubled": item["x"] * 2, "label": np.array([b"ok"], dtype=object)} for item in batch]
                """,
            "sidecar.yaml": """
                name: typed
                inputs:
                  - {name: x, datatype: FP32, shape: [-1, 4]}
                outputs:
                  - {name: doubled, datatype: FP32, shape: [-1, 4]}
                  - {name: label, datatype: BYTES, shape: [1]}
                batching: {max_batch_size: 8}
                """,
        ])
    }

    /// Takes half a second per batch: for deadlines.
    static func slowModel() throws -> URL {
        try model([
            "handler.py": "import time\n\ndef predict(batch):\n    time.sleep(0.5)\n    return batch\n",
            "sidecar.yaml": "name: slow\n",
        ])
    }

    static func echoModel() throws -> URL {
        try model(["handler.py": "def predict(batch):\n    return batch\n", "sidecar.yaml": "name: echo\n"])
    }

    static func model(_ files: [String: String]) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-front-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for (name, contents) in files {
            try contents.write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
        }
        return dir
    }

    static func json(_ text: String) -> JSONValue { try! JSONValue(json: text) }

    static func fp32Data(_ values: [Float]) -> Data {
        var data = Data()
        for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) } }
        return data
    }
}

/// Polls `condition` until it holds or `timeout` passes.
func eventually(timeout: Duration = .seconds(20), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return condition()
}
