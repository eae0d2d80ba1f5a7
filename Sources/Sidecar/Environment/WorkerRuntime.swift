import Foundation

/// The Python worker runtime (`python/sidecar_worker` in the repository) that every environment gets.
struct WorkerRuntime {
    /// The `python/` directory: the package and its `runtime-requirements.txt`.
    let root: URL
    /// Hash of every runtime file: any change to the runtime makes new environments.
    let contentHash: String

    var package: URL { root.appendingPathComponent("sidecar_worker") }
    var requirementsFile: URL { root.appendingPathComponent("runtime-requirements.txt") }

    /// `$SIDECAR_RUNTIME_DIR`, else the `python/` directory of the source tree this was built from.
    static func locate() throws -> WorkerRuntime {
        let root: URL
        if let dir = ProcessInfo.processInfo.environment["SIDECAR_RUNTIME_DIR"], !dir.isEmpty {
            root = URL(fileURLWithPath: dir)
        } else {
            // Sources/Sidecar/Environment/WorkerRuntime.swift → the repository's python/.
            root = URL(fileURLWithPath: #filePath)
                .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("python")
        }
        let init_ = root.appendingPathComponent("sidecar_worker/__init__.py")
        guard FileManager.default.fileExists(atPath: init_.path) else {
            throw SidecarError(
                .environmentFailed,
                "the Sidecar worker runtime is not at \(root.path); set SIDECAR_RUNTIME_DIR to the python/ directory of the Sidecar source")
        }
        var parts: [Data] = []
        for file in try files(in: root.appendingPathComponent("sidecar_worker")) + [root.appendingPathComponent("runtime-requirements.txt")] {
            parts.append(Data(file.path.dropFirst(root.path.count).utf8))
            parts.append(try Data(contentsOf: file))
        }
        return WorkerRuntime(root: root, contentHash: sha256Hex(parts))
    }

    /// The runtime's source files, sorted, without caches.
    private static func files(in directory: URL) throws -> [URL] {
        guard let walker = FileManager.default.enumerator(at: directory, includingPropertiesForKeys: [.isRegularFileKey]) else { return [] }
        var result: [URL] = []
        for case let url as URL in walker {
            if url.pathComponents.contains("__pycache__") { continue }
            if (try? url.resourceValues(forKeys: [.isRegularFileKey]).isRegularFile) == true, url.pathExtension == "py" || url.pathExtension == "pyi" {
                result.append(url)
            }
        }
        return result.sorted { $0.path < $1.path }
    }

    /// Copies the package into an environment's site-packages.
    func install(into sitePackages: URL) throws {
        let target = sitePackages.appendingPathComponent("sidecar_worker")
        try? FileManager.default.removeItem(at: target)
        try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
        for file in try Self.files(in: package) {
            let relative = String(file.path.dropFirst(package.path.count + 1))
            let destination = target.appendingPathComponent(relative)
            try FileManager.default.createDirectory(at: destination.deletingLastPathComponent(), withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: file, to: destination)
        }
    }
}
