import Foundation
import Logging
@testable import Sidecar

/// Shared fixtures: temporary model directories and one environment cache for the whole test run, so
/// the runtime's pip install happens once.
enum Fixtures {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var cacheDirectory: URL {
        if let dir = ProcessInfo.processInfo.environment["SIDECAR_TEST_CACHE_DIR"] { return URL(fileURLWithPath: dir) }
        return packageRoot.appendingPathComponent(".build/test-cache")
    }

    static var hostOptions: HostOptions {
        HostOptions(environment: EnvironmentOptions(cacheDirectory: cacheDirectory))
    }

    static var logger: Logger {
        var logger = Logger(label: "sidecar-test") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = ProcessInfo.processInfo.environment["SIDECAR_TEST_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .warning
        return logger
    }

    /// A fresh model directory holding `files` (name → contents).
    static func model(_ files: [String: String], name: String = "m") throws -> URL {
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("sidecar-test-\(UUID().uuidString.prefix(8))")
            .appendingPathComponent(name)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for (file, contents) in files {
            let url = dir.appendingPathComponent(file)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try contents.write(to: url, atomically: true, encoding: .utf8)
        }
        return dir
    }

    static func json(_ text: String) -> JSONValue { try! JSONValue(json: text) }
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
