import Crypto
import Foundation

/// A model directory, checked and read: its configuration, its requirements and its hooks.
///
/// The bundle is the unit every part of Sidecar agrees on: a local host loads it, and later the admin
/// API accepts it as an upload and a coordinator pushes it to other nodes. Everything that can be
/// checked without starting Python is checked here, so a bad directory fails in one line, before any
/// environment is built or any worker starts.
public struct ModelBundle: Sendable {
    /// The absolute, standardized path of the model directory.
    public let directory: URL
    public var configuration: ModelConfiguration
    /// The text of `requirements.txt`, or empty when there is none.
    public let requirements: String

    public var initScript: URL? { existingFile("init.sh") }
    public var cleanupScript: URL? { existingFile("cleanup.sh") }

    /// Reads and checks the model directory at `path`.
    public init(directory path: String) throws {
        let url = URL(fileURLWithPath: path).standardizedFileURL
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory) else {
            throw SidecarError(.invalidModel, "\(path): no such directory; pass the path of a model directory that holds handler.py")
        }
        guard isDirectory.boolValue else {
            throw SidecarError(.invalidModel, "\(path): not a directory; pass the model directory, not a file in it")
        }
        directory = url
        let name = url.lastPathComponent
        let configFile = url.appendingPathComponent("sidecar.yaml")
        if FileManager.default.fileExists(atPath: configFile.path) {
            let text: String
            do {
                text = try String(contentsOf: configFile, encoding: .utf8)
            } catch {
                throw SidecarError(.invalidModel, "\(configFile.path): cannot read: \(error.localizedDescription)")
            }
            configuration = try ModelConfiguration.parse(yaml: text, file: configFile.path, defaultName: name)
        } else {
            configuration = .defaults(name: name)
        }
        let requirementsFile = url.appendingPathComponent("requirements.txt")
        requirements = (try? String(contentsOf: requirementsFile, encoding: .utf8)) ?? ""
        try checkHandlerModule()
    }

    /// The module named by the entry point must exist as `module.py` or a package, so that a typo
    /// fails here rather than after an environment build.
    private func checkHandlerModule() throws {
        let module = String(configuration.handler.split(separator: ":")[0])
        let relative = module.replacingOccurrences(of: ".", with: "/")
        let candidates = ["\(relative).py", "\(relative)/__init__.py"]
        if candidates.contains(where: { FileManager.default.fileExists(atPath: directory.appendingPathComponent($0).path) }) {
            return
        }
        let source = handlerSource
        throw SidecarError(
            .invalidModel,
            "\(directory.path): no \(relative).py for \(source); add \(relative).py with a predict(batch) function, or set handler: module:attribute in sidecar.yaml")
    }

    /// Where the entry point came from, for error messages.
    var handlerSource: String {
        configuration.handler == ModelConfiguration.defaults(name: "").handler
            ? "the default handler: handler:predict" : "handler: \(configuration.handler) in sidecar.yaml"
    }

    private func existingFile(_ name: String) -> URL? {
        let file = directory.appendingPathComponent(name)
        return FileManager.default.fileExists(atPath: file.path) ? file : nil
    }
}
