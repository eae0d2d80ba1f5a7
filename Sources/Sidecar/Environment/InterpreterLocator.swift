import Foundation
import Logging

enum InterpreterLocator {
    /// The configured interpreter, else `$SIDECAR_PYTHON`, else the system interpreter that matches
    /// the system libpython (so that one environment serves both worker processes and the embedded
    /// executor), else `python3` on PATH.
    static func resolve(_ configured: String?) throws -> String {
        let environment = ProcessInfo.processInfo.environment
        if let configured { return try check(configured, source: "python.interpreter in sidecar.yaml") }
        if let fromEnv = environment["SIDECAR_PYTHON"], !fromEnv.isEmpty { return try check(fromEnv, source: "SIDECAR_PYTHON") }
        for candidate in ["/usr/bin/python3.11", "/usr/bin/python3"] where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        for dir in (environment["PATH"] ?? "").split(separator: ":") {
            let candidate = "\(dir)/python3"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw SidecarError(.environmentFailed, "no Python interpreter found; install python3 or set python.interpreter in sidecar.yaml")
    }

    private static func check(_ path: String, source: String) throws -> String {
        if path.contains("/") {
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw SidecarError(.environmentFailed, "\(source): \(path) is not an executable Python interpreter")
            }
            return path
        }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            let candidate = "\(dir)/\(path)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw SidecarError(.environmentFailed, "\(source): \(path) is not on PATH")
    }
}
