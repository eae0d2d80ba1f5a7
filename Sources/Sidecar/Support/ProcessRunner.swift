import Foundation
import Logging
import Subprocess

#if canImport(System)
import System
#else
import SystemPackage
#endif

/// Runs a short-lived helper process (python -m venv, pip, init.sh) to completion, sending each line
/// it prints to the log and keeping the last lines for an error message.
enum ProcessRunner {
    struct Outcome {
        var succeeded: Bool
        var status: String
        var lastLines: [String]
    }

    static func run(
        _ executable: String,
        _ arguments: [String],
        workingDirectory: URL? = nil,
        environment: [String: String] = [:],
        logger: Logger,
        label: String,
        keepLines: Int = 60
    ) async throws -> Outcome {
        var env: [Environment.Key: String?] = [:]
        for (k, v) in environment { env[Environment.Key(stringLiteral: k)] = v }
        let tail = LineTail(limit: keepLines)
        let result = try await Subprocess.run(
            .path(FilePath(executable)),
            arguments: Arguments(arguments),
            environment: .inherit.updating(env),
            workingDirectory: workingDirectory.map { FilePath($0.path) },
            input: .none,
            output: .sequence,
            error: .sequence
        ) { execution in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for try await line in execution.standardOutput.strings() {
                        logger.info("\(line)", metadata: ["process": "\(label)"])
                        tail.append(line)
                    }
                }
                group.addTask {
                    for try await line in execution.standardError.strings() {
                        logger.info("\(line)", metadata: ["process": "\(label)"])
                        tail.append(line)
                    }
                }
                try await group.waitForAll()
            }
        }
        return Outcome(
            succeeded: result.terminationStatus.isSuccess,
            status: "\(result.terminationStatus)",
            lastLines: tail.lines)
    }
}

/// The last `limit` lines a process printed.
final class LineTail: Sendable {
    private let state: LockedBox<[String]>
    private let limit: Int

    init(limit: Int) {
        self.limit = limit
        self.state = LockedBox([])
    }

    func append(_ line: String) {
        state.withLock { lines in
            lines.append(line)
            if lines.count > limit { lines.removeFirst(lines.count - limit) }
        }
    }

    var lines: [String] { state.withLock { $0 } }
}
