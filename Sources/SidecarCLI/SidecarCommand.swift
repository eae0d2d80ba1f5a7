import ArgumentParser
import Foundation
import Logging
import Sidecar

@main
struct SidecarCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sidecar",
        abstract: "Serve Python models from a directory: handler.py, requirements.txt, sidecar.yaml.",
        subcommands: [
            PredictCommand.self, ServeCommand.self, StatusCommand.self, ScaleCommand.self, LoadCommand.self, UnloadCommand.self, ReloadCommand.self,
            BatchCommand.self, InitCommand.self, PublishCommand.self, RollbackCommand.self, SyncCommand.self, DeployCommand.self, KeysCommand.self,
        ])
}

/// Options every command that starts models shares.
struct HostArguments: ParsableArguments {
    @Option(name: .long, help: "Cache directory for Python environments (default: $SIDECAR_CACHE_DIR or ~/.cache/sidecar).")
    var cacheDir: String?

    @Option(name: .customLong("pip-arg"), parsing: .unconditionalSingleValue, help: "An extra argument for pip install (repeatable), e.g. --pip-arg=--no-index --pip-arg=--find-links=/wheels.")
    var pipArgs: [String] = []

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func hostOptions() -> HostOptions {
        HostOptions(environment: EnvironmentOptions(cacheDirectory: cacheDir.map { URL(fileURLWithPath: $0) }, pipArgs: pipArgs))
    }

    func logger() throws -> Logger {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical; got '\(logLevel)'")
        }
        var logger = Logger(label: "sidecar") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = level
        return logger
    }
}

/// Prints a Sidecar error the way a person can act on it, and picks the exit code: 2 for a bad model
/// directory or configuration (nothing was started), 1 for everything else.
func reportFailure(_ error: any Error) -> ExitCode {
    if let error = error as? SidecarError {
        StandardStreams.err("error: \(error.message)\n")
        if let detail = error.detail, !detail.isEmpty {
            StandardStreams.err("\(detail)\n")
        }
        return error.code == .invalidModel || error.code == .invalidConfiguration ? ExitCode(2) : ExitCode(1)
    }
    StandardStreams.err("error: \(error)\n")
    return ExitCode(1)
}
