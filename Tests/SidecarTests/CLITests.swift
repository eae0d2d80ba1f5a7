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

    func sidecar(_ arguments: [String], input: String = "") async throws -> Run {
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
}
