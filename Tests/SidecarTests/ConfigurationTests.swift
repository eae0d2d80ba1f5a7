import Foundation
import Testing
@testable import Sidecar

@Suite struct ConfigurationTests {
    @Test func emptyFileMeansDefaults() throws {
        let config = try ModelConfiguration.parse(yaml: "", file: "sidecar.yaml", defaultName: "dir")
        #expect(config == .defaults(name: "dir"))
        #expect(config.handler == "handler:predict")
        #expect(config.workers == 1)
    }

    @Test func readsEveryKey() throws {
        let yaml = """
            name: iris
            handler: model:Classifier
            workers: 3
            max_retries: 1
            batching: {max_batch_size: 128, max_delay_ms: 5, max_queue: 500}
            timeouts: {startup_s: 10, ping_interval_s: 0.5, ping_timeout_s: 4, shutdown_grace_s: 2}
            python: {interpreter: /usr/bin/python3, pip_args: ["--no-index"]}
            config: {threshold: 0.5, labels: [a, b], nested: {on: true}}
            """
        let config = try ModelConfiguration.parse(yaml: yaml, file: "sidecar.yaml", defaultName: "dir")
        #expect(config.name == "iris")
        #expect(config.handler == "model:Classifier")
        #expect(config.workers == 3)
        #expect(config.maxRetries == 1)
        #expect(config.batching.maxBatchSize == 128)
        #expect(config.batching.maxDelay == .milliseconds(5))
        #expect(config.batching.maxQueue == 500)
        #expect(config.timeouts.pingInterval == .milliseconds(500))
        #expect(config.python.interpreter == "/usr/bin/python3")
        #expect(config.python.pipArgs == ["--no-index"])
        let dict = try JSONSerialization.jsonObject(with: config.handlerConfig.data) as! [String: Any]
        #expect(dict["threshold"] as? Double == 0.5)
        #expect(dict["labels"] as? [String] == ["a", "b"])
    }

    @Test func unknownKeyNamesFileKeyAndChoices() {
        let error = #expect(throws: SidecarError.self) {
            try ModelConfiguration.parse(yaml: "workers: 2\nbatchign:\n  max_batch_size: 3\n", file: "/m/sidecar.yaml", defaultName: "m")
        }
        #expect(error?.code == .invalidModel)
        #expect(error?.message.contains("/m/sidecar.yaml") == true)
        #expect(error?.message.contains("unknown key 'batchign'") == true)
        #expect(error?.message.contains("batching") == true)
    }

    @Test func nestedUnknownKeyGetsItsPath() {
        let error = #expect(throws: SidecarError.self) {
            try ModelConfiguration.parse(yaml: "batching:\n  max_size: 3\n", file: "s.yaml", defaultName: "m")
        }
        #expect(error?.message.contains("'batching.max_size'") == true)
    }

    @Test(arguments: [
        ("workers: many", "'workers' must be an integer from 1 to 256"),
        ("workers: 0", "'workers' must be an integer from 1 to 256"),
        ("handler: predict", "'handler' must be an entry point 'module:attribute'"),
        ("batching: {max_batch_size: -1}", "'batching.max_batch_size' must be an integer"),
        ("batching: {max_delay_ms: soon}", "'batching.max_delay_ms' must be a number of milliseconds"),
        ("timeouts: {startup_s: 0}", "'timeouts.startup_s' must be a positive number of seconds"),
        ("python: {pip_args: --no-index}", "'python.pip_args' must be a list of strings"),
        ("name: 'a b'", "'name' must be letters, digits"),
        ("- a\n- b", "'the top level' must be a mapping"),
    ])
    func badValuesSayWhatIsExpected(yaml: String, expected: String) {
        let error = #expect(throws: SidecarError.self) {
            try ModelConfiguration.parse(yaml: yaml, file: "sidecar.yaml", defaultName: "m")
        }
        #expect(error?.message.contains(expected) == true, "\(error?.message ?? "no error")")
        #expect(error?.message.contains("sidecar.yaml") == true)
    }

    @Test func missingDirectory() {
        let error = #expect(throws: SidecarError.self) { try ModelBundle(directory: "/nonexistent/model") }
        #expect(error?.message.contains("/nonexistent/model: no such directory") == true)
    }

    @Test func missingHandlerFile() throws {
        let dir = try Fixtures.model(["requirements.txt": ""])
        let error = #expect(throws: SidecarError.self) { try ModelBundle(directory: dir.path) }
        #expect(error?.message.contains("no handler.py") == true)
    }

    @Test func entryPointModuleMustExist() throws {
        let dir = try Fixtures.model(["handler.py": "def predict(b): return b", "sidecar.yaml": "handler: model:predict"])
        let error = #expect(throws: SidecarError.self) { try ModelBundle(directory: dir.path) }
        #expect(error?.message.contains("no model.py for handler: model:predict in sidecar.yaml") == true)
    }

    @Test func nameDefaultsToDirectory() throws {
        let dir = try Fixtures.model(["handler.py": "def predict(b): return b"], name: "my-model")
        #expect(try ModelBundle(directory: dir.path).configuration.name == "my-model")
    }
}

@Suite struct JSONTests {
    @Test func splitsTopLevelElements() throws {
        let text = #"[1, "a,]b", {"k": [1, {"x": "}"}]}, null , [ ], "q\"u"]"#
        let data = Data(text.utf8)
        let parts = try JSONArraySplitter.split(data).map { String(decoding: data[$0], as: UTF8.self) }
        #expect(parts == ["1", #""a,]b""#, #"{"k": [1, {"x": "}"}]}"#, "null", "[ ]", #""q\"u""#])
    }

    @Test func emptyArray() throws {
        #expect(try JSONArraySplitter.split(Data("[]".utf8)).isEmpty)
        #expect(try JSONArraySplitter.split(Data(" [ ] ".utf8)).isEmpty)
    }

    @Test func rejectsNonArrays() {
        #expect(throws: (any Error).self) { try JSONArraySplitter.split(Data("{}".utf8)) }
        #expect(throws: (any Error).self) { try JSONArraySplitter.split(Data("[1, 2".utf8)) }
    }

    @Test func validatesValues() throws {
        #expect(try JSONValue(json: "42").json == "42")
        #expect(try JSONValue(json: #"{"a": [1, null]}"#).json == #"{"a": [1, null]}"#)
        #expect(throws: JSONValueError.self) { try JSONValue(json: "{oops") }
        #expect(throws: JSONValueError.self) { try JSONValue(json: "") }
    }
}

@Suite struct ReferenceConfigTests {
    /// Config/model-sidecar.yaml documents every key at its default: it must parse to the defaults.
    @Test func referenceFileParsesToTheDefaults() throws {
        let file = Fixtures.packageRoot.appendingPathComponent("Config/model-sidecar.yaml")
        let config = try ModelConfiguration.parse(yaml: try String(contentsOf: file, encoding: .utf8), file: file.path, defaultName: "x")
        #expect(config == .defaults(name: "x"))
    }
}
