import Foundation
import Logging

/// A model's isolated Python environment: a virtual environment with the worker runtime and the
/// model's `requirements.txt` installed.
///
/// Environments are cached by content: the key hashes the interpreter (its path and full version),
/// the requirements and the worker runtime, so models with identical requirements share one, and a
/// second start with the same key runs no pip at all.
public struct PythonEnvironment: Sendable {
    /// The environment's directory (a virtual environment).
    public let directory: URL
    /// The cache key the directory is named after.
    public let key: String
    /// True when this call built the environment, false when it reused a cached one.
    public let wasBuilt: Bool

    /// The environment's interpreter, which runs the workers.
    public var python: URL { directory.appendingPathComponent("bin/python") }
}

/// Where environments live and how to build them.
public struct EnvironmentOptions: Sendable {
    /// The cache directory; environments go under `envs/` inside it.
    /// Default: `$SIDECAR_CACHE_DIR`, else `~/.cache/sidecar`.
    public var cacheDirectory: URL
    /// Arguments added to every `pip install` (after the model's own `python.pip_args`), e.g. an index
    /// URL or `--no-index --find-links DIR` for offline machines. pip's own `PIP_*` environment
    /// variables also pass through.
    public var pipArgs: [String]

    public init(cacheDirectory: URL? = nil, pipArgs: [String] = []) {
        self.cacheDirectory = cacheDirectory ?? Self.defaultCacheDirectory
        self.pipArgs = pipArgs
    }

    public static var defaultCacheDirectory: URL {
        if let dir = ProcessInfo.processInfo.environment["SIDECAR_CACHE_DIR"], !dir.isEmpty {
            return URL(fileURLWithPath: dir)
        }
        // $XDG_CACHE_HOME, then $HOME (a container often runs with a HOME that is not the passwd
        // entry's), then the passwd entry's home.
        let environment = ProcessInfo.processInfo.environment
        if let cache = environment["XDG_CACHE_HOME"], !cache.isEmpty { return URL(fileURLWithPath: cache).appendingPathComponent("sidecar") }
        if let home = environment["HOME"], !home.isEmpty { return URL(fileURLWithPath: home).appendingPathComponent(".cache/sidecar") }
        return FileManager.default.homeDirectoryForCurrentUser.appendingPathComponent(".cache/sidecar")
    }
}

/// Builds (or finds in the cache) the environment for a bundle, and runs its `init.sh`.
struct EnvironmentBuilder {
    let options: EnvironmentOptions
    let logger: Logger

    /// Format of the cache layout; bump to invalidate every cached environment.
    static let layoutVersion = "sidecar-env-1"

    func prepare(_ bundle: ModelBundle) async throws -> PythonEnvironment {
        let interpreter = try InterpreterLocator.resolve(bundle.configuration.python.interpreter)
        let identity = try await interpreterIdentity(interpreter)
        let runtime = try WorkerRuntime.locate()
        let key = sha256Hex([
            Data(Self.layoutVersion.utf8), Data(identity.utf8), Data(bundle.requirements.utf8), Data(runtime.contentHash.utf8),
        ])
        let shortKey = String(key.prefix(24))
        let envs = options.cacheDirectory.appendingPathComponent("envs")
        let directory = envs.appendingPathComponent(shortKey)
        try FileManager.default.createDirectory(at: envs, withIntermediateDirectories: true)

        // Two servers starting the same model at once must not both run pip into one directory.
        let lock = try await FileLock.acquire(envs.appendingPathComponent("\(shortKey).lock"), logger: logger)
        defer { lock.release() }

        let marker = directory.appendingPathComponent(".sidecar-env-complete")
        var built = false
        if FileManager.default.fileExists(atPath: marker.path) {
            logger.info("reusing cached Python environment \(directory.path)")
        } else {
            try await build(at: directory, interpreter: interpreter, runtime: runtime, bundle: bundle)
            try Data("\(key)\n\(identity)\n".utf8).write(to: marker)
            built = true
        }
        let environment = PythonEnvironment(directory: directory, key: key, wasBuilt: built)
        try await runInitScript(bundle, environment: environment)
        return environment
    }

    /// "path|version": two interpreters of the same version but different builds must not share.
    private func interpreterIdentity(_ interpreter: String) async throws -> String {
        let outcome = try await ProcessRunner.run(
            interpreter, ["-c", "import sys, os; print(os.path.realpath(sys.executable) + '|' + sys.version.replace(chr(10), ' '))"],
            logger: Logger(label: "sidecar.quiet", factory: { _ in SwiftLogNoOpLogHandler() }), label: "python")
        guard outcome.succeeded, let line = outcome.lastLines.last else {
            throw SidecarError(
                .environmentFailed, "the Python interpreter \(interpreter) does not run (\(outcome.status))",
                detail: outcome.lastLines.joined(separator: "\n"))
        }
        return line
    }

    private func build(at directory: URL, interpreter: String, runtime: WorkerRuntime, bundle: ModelBundle) async throws {
        let name = bundle.configuration.name
        // A directory without the completion marker is a build that died half-way: start over.
        try? FileManager.default.removeItem(at: directory)
        logger.info("building Python environment for model '\(name)' at \(directory.path) with \(interpreter)")

        let venv = try await ProcessRunner.run(interpreter, ["-m", "venv", directory.path], logger: logger, label: "venv")
        guard venv.succeeded else {
            let hint = venv.lastLines.contains { $0.contains("ensurepip") }
                ? " (on Debian, install the venv module: apt-get install python3-venv)" : ""
            throw SidecarError(
                .environmentFailed, "could not create a virtual environment with \(interpreter)\(hint)",
                detail: venv.lastLines.joined(separator: "\n"))
        }
        let python = directory.appendingPathComponent("bin/python").path

        // The runtime is copied, not pip-built: building a local package needs setuptools from the
        // index, which offline machines do not have, and a copy is exact.
        let purelib = try await ProcessRunner.run(
            python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], logger: logger, label: "venv")
        guard purelib.succeeded, let sitePackages = purelib.lastLines.last else {
            throw SidecarError(.environmentFailed, "the new environment's Python does not run", detail: purelib.lastLines.joined(separator: "\n"))
        }
        try runtime.install(into: URL(fileURLWithPath: sitePackages))

        var args = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", runtime.requirementsFile.path]
        if !bundle.requirements.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            args += ["-r", bundle.directory.appendingPathComponent("requirements.txt").path]
        }
        args += bundle.configuration.python.pipArgs + options.pipArgs
        logger.info("pip install for model '\(name)' (its output follows)")
        let pip = try await ProcessRunner.run(
            python, args, workingDirectory: bundle.directory, environment: ["PIP_PROGRESS_BAR": "off"],
            logger: logger, label: "pip", keepLines: 80)
        guard pip.succeeded else {
            try? FileManager.default.removeItem(at: directory)
            throw PipFailure.explain(pip.lastLines, model: name, requirements: bundle.directory.appendingPathComponent("requirements.txt").path)
        }
    }

    private func runInitScript(_ bundle: ModelBundle, environment: PythonEnvironment) async throws {
        guard let script = bundle.initScript else { return }
        let contents = (try? Data(contentsOf: script)) ?? Data()
        // Once per environment and script: a changed init.sh runs again, an unchanged one does not.
        let marker = environment.directory.appendingPathComponent(
            ".init-" + String(sha256Hex([Data(bundle.directory.path.utf8), contents]).prefix(16)))
        if FileManager.default.fileExists(atPath: marker.path) { return }
        logger.info("running \(script.path)")
        let outcome = try await ProcessRunner.run(
            "/bin/bash", [script.path], workingDirectory: bundle.directory,
            environment: HookEnvironment.variables(bundle: bundle, environment: environment),
            logger: logger, label: "init.sh")
        guard outcome.succeeded else {
            throw SidecarError(
                .environmentFailed, "\(script.path) failed (\(outcome.status)); fix the script and start again",
                detail: outcome.lastLines.joined(separator: "\n"))
        }
        try Data().write(to: marker)
    }
}

/// What `init.sh` and `cleanup.sh` see: the environment activated and where the model lives.
enum HookEnvironment {
    static func variables(bundle: ModelBundle, environment: PythonEnvironment) -> [String: String] {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return [
            "VIRTUAL_ENV": environment.directory.path,
            "PATH": environment.directory.appendingPathComponent("bin").path + ":" + path,
            "SIDECAR_MODEL_DIR": bundle.directory.path,
            "SIDECAR_MODEL_NAME": bundle.configuration.name,
        ]
    }
}
