import Foundation
import Testing
@testable import Sidecar

/// The embedded executor with the real interpreter, in this test process. Every model here has no
/// requirements.txt, so all share the one environment the process's interpreter can run.
@Suite(.serialized) struct EmbeddedExecutorTests {
    func withEmbedded<R: Sendable>(
        _ files: [String: String], name: String = "m", _ body: (Model) async throws -> R
    ) async throws -> R {
        let dir = try Fixtures.model(files, name: name)
        return try await withModel(at: dir.path, executor: .embedded, options: Fixtures.hostOptions, logger: Fixtures.logger, body)
    }

    @Test func echoRunsInThisProcess() async throws {
        try await withEmbedded(["handler.py": "import os\ndef predict(batch):\n    return [[item, os.getpid()] for item in batch]\n"]) { model in
            let answer = try await model.predict(Fixtures.json(#"{"x": [1, 2.5, "three"]}"#))
            let pair = try JSONSerialization.jsonObject(with: answer.data) as! [Any]
            #expect((pair[1] as! Int) == Int(getpid()))
            #expect(model.executorKind == .embedded)
            #expect(model.workers.count == 1)
            #expect(model.workers.first?.pid == getpid())
            #expect(model.workers.first?.pythonVersion?.hasPrefix("3.11") == true)
            let many = try await model.predict(batch: (0..<200).map { Fixtures.json("\($0)") })
            #expect(try many.map { try ($0.get().decode([Int].self))[0] } == Array(0..<200))
        }
    }
}
