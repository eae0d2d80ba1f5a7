import Foundation
import Subprocess
import Testing

#if canImport(System)
import System
#else
import SystemPackage
#endif

/// The `sidecar` executable, run the way a user runs it.
@Suite(.serialized) struct CLITests {
    struct Run {
        var status: TerminationStatus
        var stdout: String
        var stderr: String
        var exitCode: Int32? { if case .exited(let code) = status { return code }; return nil }
    }

    static var binary: String { Fixtures.packageRoot.appendingPathComponent(".build/debug/sidecar").path }

    struct StaleBinary: Error, CustomStringConvertible {
        var description: String
    }

    /// These tests run the built `sidecar`, which `swift test` does not rebuild (a test target cannot
    /// depend on an executable): a missing or stale binary is refused with what to run, rather than
    /// silently testing old code. `scripts/test.sh` builds it first (`swift build --build-tests`).
    static let freshness: Result<Void, StaleBinary> = {
        let files = FileManager.default
        let root = Fixtures.packageRoot
        func modified(_ url: URL) -> Date? { (try? files.attributesOfItem(atPath: url.path))?[.modificationDate] as? Date }
        guard let built = modified(URL(fileURLWithPath: binary)) else {
            return .failure(StaleBinary(description: "\(binary) does not exist: run `swift build` (or scripts/test.sh) before `swift test`"))
        }
        var newest: (Date, String)?
        let sources = root.appendingPathComponent("Sources")
        for case let file as URL in files.enumerator(at: sources, includingPropertiesForKeys: [.contentModificationDateKey]) ?? .init()
        // sidecar-bench's sources are not the CLI's: editing them relinks nothing here.
        where file.pathExtension == "swift" && !file.path.contains("/Sources/SidecarBenchmark/") {
            if let date = modified(file), date > (newest?.0 ?? .distantPast) { newest = (date, file.path) }
        }
        if let (date, path) = newest, date > built {
            return .failure(StaleBinary(description: "\(binary) is older than \(path): run `swift build` (or scripts/test.sh) before `swift test`"))
        }
        return .success(())
    }()

    func sidecar(_ arguments: [String], input: String = "") async throws -> Run {
        try Self.freshness.get()
        let result = try await Subprocess.run(
            .path(FilePath(Self.binary)),
            arguments: Arguments(arguments + ["--cache-dir", Fixtures.cacheDirectory.path]),
            input: .string(input),
            output: .string(limit: 1 << 20),
            error: .string(limit: 1 << 20))
        return Run(status: result.terminationStatus, stdout: result.standardOutput, stderr: result.standardError)
    }

    @Test func predictWritesOneLinePerInputInOrderAndNamesBadLines() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(batch):\n    return [{'in': x} for x in batch]\n"])
        let input = "1\n{\"a\": 2}\nnot json\n\n[3]\n"
        let run = try await sidecar(["predict", dir.path, "--workers", "2", "--log-level", "warning"], input: input)
        let lines = run.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 4, "stdout: \(run.stdout) stderr: \(run.stderr)")
        #expect(lines[0] == #"{"in":1}"#)
        #expect(lines[1] == #"{"in":{"a":2}}"#)
        #expect(lines[2].contains(#""line":3"#))
        #expect(lines[2].contains("not valid JSON"))
        #expect(lines[3] == #"{"in":[3]}"#)
        #expect(run.exitCode == 1)  // one line failed
        #expect(run.stderr.contains("1 line(s) got an error"))
    }

    @Test func predictFromFileExitsZeroWhenAllLinesSucceed() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch\n"])
        let input = dir.appendingPathComponent("in.jsonl")
        try (1...500).map { "{\"n\": \($0)}" }.joined(separator: "\n").write(to: input, atomically: true, encoding: .utf8)
        let run = try await sidecar(["predict", dir.path, "--input", input.path, "--log-level", "error"])
        #expect(run.exitCode == 0, "\(run.stderr)")
        let lines = run.stdout.split(separator: "\n")
        #expect(lines.count == 500)
        #expect(lines.last == #"{"n":500}"#)
    }

    @Test func invalidConfigurationIsOneLineAndExitCode2() async throws {
        let dir = try Fixtures.model(["handler.py": "def predict(b): return b\n", "sidecar.yaml": "workers: lots\n"])
        let run = try await sidecar(["predict", dir.path], input: "1\n")
        #expect(run.exitCode == 2)
        #expect(run.stdout.isEmpty)
        let errorLines = run.stderr.split(separator: "\n")
        #expect(errorLines.count == 1, "\(run.stderr)")
        #expect(run.stderr.contains("sidecar.yaml"))
        #expect(run.stderr.contains("'workers' must be an integer"))
    }

    @Test func missingEntryPointExitCode2() async throws {
        let dir = try Fixtures.model(["handler.py": "def run(b): return b\n", "sidecar.yaml": "name: x\n"])
        let run = try await sidecar(["predict", dir.path], input: "1\n")
        #expect(run.exitCode == 2)
        #expect(run.stderr.contains("defines no top-level 'predict' for the default handler"), "\(run.stderr)")
    }

    @Test func syntaxErrorExitCode2WithFileAndLine() async throws {
        let dir = try Fixtures.model(["handler.py": "x = 1\ndef predict(b) return b\n"])
        let run = try await sidecar(["predict", dir.path], input: "1\n")
        #expect(run.exitCode == 2)
        #expect(run.stderr.contains("handler.py:2: SyntaxError"), "\(run.stderr)")
    }

    @Test func missingDirectoryExitCode2() async throws {
        let run = try await sidecar(["predict", "/nonexistent/model"], input: "")
        #expect(run.exitCode == 2)
        #expect(run.stderr.contains("/nonexistent/model: no such directory"))
    }

    @Test func handlerThatFailsToImportExitsNonZeroWithTraceback() async throws {
        let dir = try Fixtures.model(["handler.py": "import not_a_real_module_xyz\n\ndef predict(b):\n    return b\n"])
        let run = try await sidecar(["predict", dir.path, "--log-level", "error"], input: "1\n")
        #expect(run.exitCode == 1)
        #expect(run.stderr.contains("ModuleNotFoundError"))
        #expect(run.stderr.contains("not_a_real_module_xyz"))
        #expect(run.stderr.contains("Traceback"))
    }

    @Test func failingRequirementIsNamed() async throws {
        let dir = try Fixtures.model([
            "handler.py": "def predict(b): return b\n",
            "requirements.txt": "sidecar-no-such-package-4711==1.0\n",
        ])
        let run = try await sidecar(["predict", dir.path, "--log-level", "error"], input: "1\n")
        #expect(run.exitCode == 1)
        #expect(run.stderr.contains("pip could not install 'sidecar-no-such-package-4711==1.0'"), "\(run.stderr)")
    }

    @Test func initScaffoldsAModelWhoseSamplePredicts() async throws {
        // The sidecar built next to this test binary (whatever --build-path), else .build/debug.
        let sibling = Bundle.main.executableURL?.deletingLastPathComponent().appendingPathComponent("sidecar").path
        let binary = [sibling, Self.binary].compactMap { $0 }.first { FileManager.default.isExecutableFile(atPath: $0) } ?? Self.binary
        func run(_ arguments: [String]) async throws -> Run {
            let result = try await Subprocess.run(
                .path(FilePath(binary)), arguments: Arguments(arguments), input: .none,
                output: .string(limit: 1 << 20), error: .string(limit: 1 << 20))
            return Run(status: result.terminationStatus, stdout: result.standardOutput, stderr: result.standardError)
        }
        let parent = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-init-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: parent, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: parent) }
        let model = parent.appendingPathComponent("hello-model")
        let sample = model.appendingPathComponent("sample.jsonl")

        let created = try await run(["init", "hello-model", "--directory", parent.path])
        #expect(created.exitCode == 0, "\(created.stderr)")
        for file in ["handler.py", "requirements.txt", "sidecar.yaml", "sample.jsonl"] {
            #expect(FileManager.default.fileExists(atPath: model.appendingPathComponent(file).path), "\(file) missing")
        }
        #expect(created.stdout.contains("sidecar predict \(model.path) --input \(sample.path)"), "\(created.stdout)")
        #expect(created.stdout.contains("sidecar serve \(model.path)"), "\(created.stdout)")

        // The printed next command works as is.
        let predicted = try await run([
            "predict", model.path, "--input", sample.path, "--cache-dir", Fixtures.cacheDirectory.path, "--log-level", "warning",
        ])
        #expect(predicted.exitCode == 0, "\(predicted.stderr)")
        #expect(
            predicted.stdout.split(separator: "\n") == [
                #"{"upper":"HELLO SIDECAR","words":2}"#, #"{"sum":6.5,"count":3}"#, #"{"upper":"ONE BATCH, MANY ITEMS","words":4}"#,
            ], "\(predicted.stdout)")
        // An item it does not understand fails alone, with the handler's message.
        try "{\"text\": \"ok\"}\n42\n".write(to: parent.appendingPathComponent("mixed.jsonl"), atomically: true, encoding: .utf8)
        let mixed = try await run([
            "predict", model.path, "--input", parent.appendingPathComponent("mixed.jsonl").path, "--cache-dir", Fixtures.cacheDirectory.path,
            "--log-level", "error",
        ])
        #expect(mixed.exitCode == 1)
        let mixedLines = mixed.stdout.split(separator: "\n")
        #expect(mixedLines.first == #"{"upper":"OK","words":1}"#, "\(mixed.stdout)")
        #expect(mixedLines.last?.contains("ValueError: expected") == true, "\(mixed.stdout)")

        // Refusals: one line, exit code 2, nothing touched.
        let again = try await run(["init", "hello-model", "--directory", parent.path])
        #expect(again.exitCode == 2)
        #expect(again.stderr.split(separator: "\n").count == 1, "\(again.stderr)")
        #expect(again.stderr.contains("already exists"), "\(again.stderr)")
        let badName = try await run(["init", "my model/x", "--directory", parent.path])
        #expect(badName.exitCode == 2)
        #expect(badName.stderr.split(separator: "\n").count == 1, "\(badName.stderr)")
        #expect(badName.stderr.contains("'my model/x' is not a valid model name"), "\(badName.stderr)")
        let noParent = try await run(["init", "m", "--directory", parent.appendingPathComponent("nope").path])
        #expect(noParent.exitCode == 2)
        #expect(noParent.stderr.contains("no such directory"), "\(noParent.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: parent.path).sorted() == ["hello-model", "mixed.jsonl"])
    }
}
