import Foundation
import Logging

/// A node's bundles on disk, by SHA-256: `<cache>/bundles/<sha256>.tar.gz` (as fetched, so the node
/// can serve it to others) and `<sha256>/` (unpacked, the model directory the host loads). A bundle
/// is fetched once: a version rolled back to, or published again, is already here. Unpacking goes
/// into a fresh staging directory that is renamed into place, so a directory under its hash is
/// always complete, also when several nodes share the cache.
public struct BundleStore: Sendable {
    public let root: URL
    public let limits: BundleArchive.Limits

    public init(root: URL, limits: BundleArchive.Limits = .init()) {
        self.root = root.standardizedFileURL
        self.limits = limits
    }

    func unpackedURL(_ sha256: String) -> URL { root.appendingPathComponent(sha256) }

    /// The fetched archive of `sha256`, if this node has it (what `/repository/bundles/` serves).
    public func archive(_ sha256: String) -> URL? {
        guard RepositoryManifest.isSHA256(sha256) else { return nil }
        let url = root.appendingPathComponent("\(sha256).tar.gz")
        return FileManager.default.fileExists(atPath: url.path) ? url : nil
    }

    /// The model directory of bundle `sha256`, if this node has it.
    public func directory(for sha256: String) -> URL? {
        guard RepositoryManifest.isSHA256(sha256) else { return nil }
        return Self.modelDirectory(in: unpackedURL(sha256))
    }

    /// The model directory of bundle `sha256`, fetched from `source` if this node lacks it:
    /// retried with backoff, checked (hash, sizes, every entry) before anything is written.
    /// `fetched` gets the bytes moved.
    func directory(
        for sha256: String, from source: any RepositorySource, attempts: Int = 4, logger: Logger,
        fetched: (Int) -> Void = { _ in }
    ) async throws -> URL {
        let unpacked = unpackedURL(sha256)
        if let found = Self.modelDirectory(in: unpacked) { return found }
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        var delay = Duration.milliseconds(500)
        var data: Data?
        for attempt in 1...attempts {
            do {
                let bytes = try await source.bundle(sha256: sha256, limit: limits.maxCompressedBytes)
                fetched(bytes.count)
                // A truncated or corrupted download is retried like a failed one; a bundle that
                // arrives intact but wrong is refused below by unpack's checks.
                guard BundleArchive.sha256Hex(of: bytes) == sha256 else {
                    throw SidecarError(
                        .invalidInput,
                        "bundle \(sha256.prefix(12))… from \(source.description) has SHA-256 \(BundleArchive.sha256Hex(of: bytes).prefix(12))… (\(bytes.count) bytes): corrupted or truncated")
                }
                data = bytes
                break
            } catch {
                if attempt == attempts || Task.isCancelled { throw error }
                logger.warning("fetching bundle \(sha256.prefix(12))… failed (attempt \(attempt) of \(attempts)): \(error); retrying in \(delay)")
                try await Task.sleep(for: delay)
                delay *= 2
            }
        }
        guard let data else { throw SidecarError(.unavailable, "bundle \(sha256) was not fetched") }
        return try await install(data, sha256: sha256)
    }

    /// Checks `data` against `sha256` and every rule of ``BundleArchive/unpack(_:sha256:into:limits:)``,
    /// then keeps it (archive and unpacked directory). Returns the model directory.
    public func install(_ data: Data, sha256: String) async throws -> URL {
        guard RepositoryManifest.isSHA256(sha256) else {
            throw SidecarError(.invalidInput, "a bundle is named by its SHA-256 (64 lowercase hex digits), got '\(sha256.prefix(80))'")
        }
        if let found = directory(for: sha256) { return found }
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let unpacked = unpackedURL(sha256)
        let staging = root.appendingPathComponent(".staging-\(sha256.prefix(12))-\(UInt64.random(in: 0...UInt64.max))")
        defer { try? FileManager.default.removeItem(at: staging) }
        _ = try await BundleArchive.unpack(data, sha256: sha256, into: staging, limits: limits)
        try RepositoryPublisher.writeAtomically(data, to: root.appendingPathComponent("\(sha256).tar.gz"))
        if rename(staging.path, unpacked.path) != 0, !FileManager.default.fileExists(atPath: unpacked.path) {
            throw SidecarError(.unavailable, "cannot move the unpacked bundle to \(unpacked.path): \(String(cString: strerror(errno)))")
        }
        // Another node sharing this cache may have won the rename: its copy is as good as ours.
        guard let found = Self.modelDirectory(in: unpacked) else {
            throw SidecarError(.invalidInput, "bundle \(sha256.prefix(12))… holds no model directory (no sidecar.yaml or handler.py)")
        }
        return found
    }

    /// The model directory inside an unpacked bundle: the root, or its one top-level directory.
    static func modelDirectory(in unpacked: URL) -> URL? {
        let manager = FileManager.default
        func isModel(_ url: URL) -> Bool {
            manager.fileExists(atPath: url.appendingPathComponent("sidecar.yaml").path)
                || manager.fileExists(atPath: url.appendingPathComponent("handler.py").path)
        }
        if isModel(unpacked) { return unpacked }
        guard let children = try? manager.contentsOfDirectory(at: unpacked, includingPropertiesForKeys: nil) else { return nil }
        let directories = children.filter { (try? $0.resourceValues(forKeys: [.isDirectoryKey]).isDirectory) == true }
        return directories.count == 1 && isModel(directories[0]) ? directories[0] : nil
    }

    /// Removes every bundle not in `keep`. Returns how many went.
    @discardableResult
    func collect(keeping keep: Set<String>, logger: Logger) -> Int {
        guard let children = try? FileManager.default.contentsOfDirectory(atPath: root.path) else { return 0 }
        var removed = Set<String>()
        for child in children {
            let sha = child.hasSuffix(".tar.gz") ? String(child.dropLast(".tar.gz".count)) : child
            guard RepositoryManifest.isSHA256(sha), !keep.contains(sha) else { continue }
            try? FileManager.default.removeItem(at: root.appendingPathComponent(child))
            removed.insert(sha)
        }
        if !removed.isEmpty { logger.info("removed \(removed.count) old bundle(s) from \(root.path)") }
        return removed.count
    }
}
