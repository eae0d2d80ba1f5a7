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

    /// A fresh directory to build a bundle in before ``place(_:as:)`` renames it into place.
    private func stagingURL(_ sha256: String) -> URL {
        root.appendingPathComponent(".staging-\(sha256.prefix(12))-\(UInt64.random(in: 0...UInt64.max))")
    }

    /// The fetched archive of `sha256`, if this node has it (what `/repository/bundles/` serves).
    public func archive(_ sha256: String) -> URL? {
        guard RepositoryManifest.isSHA256(sha256) else { return nil }
        let url = root.appendingPathComponent("\(sha256).tar.gz")
        return FileManager.default.fileExists(atPath: url.path) ? url : nil
    }

    /// A file this node serves to others under `/repository/`: `bundles/<sha>.tar.gz`,
    /// `bundles/<sha>.files.json` or `files/<sha>` (nothing else: names are checked, never joined blindly).
    public func served(_ path: String) -> URL? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 else { return nil }
        let url: URL
        switch parts[0] {
        case "bundles" where parts[1].hasSuffix(".tar.gz") && RepositoryManifest.isSHA256(String(parts[1].dropLast(7))):
            url = root.appendingPathComponent(parts[1])
        case "bundles" where parts[1].hasSuffix(".files.json") && RepositoryManifest.isSHA256(String(parts[1].dropLast(11))):
            url = root.appendingPathComponent(parts[1])
        case "files" where RepositoryManifest.isSHA256(parts[1]):
            url = filesURL.appendingPathComponent(parts[1])
        default:
            return nil
        }
        return FileManager.default.fileExists(atPath: url.path) ? url : nil
    }

    var filesURL: URL { root.appendingPathComponent("files") }

    /// The model directory of bundle `sha256`, if this node has it.
    public func directory(for sha256: String) -> URL? {
        guard RepositoryManifest.isSHA256(sha256) else { return nil }
        return Self.modelDirectory(in: unpackedURL(sha256))
    }

    /// The model directory of bundle `sha256`, fetched from `source` if this node lacks it:
    /// retried with backoff, checked (hash, sizes, every entry) before anything is written.
    /// `fetched` gets the bytes moved.
    ///
    /// With `files` (the SHA-256 of the bundle's file index, from the manifest), it fetches the
    /// index and only the files this node lacks; if that fails it falls back to the `.tar.gz`.
    func directory(
        for sha256: String, files: String? = nil, from source: any RepositorySource, attempts: Int = 4, logger: Logger,
        fetched: (Int) -> Void = { _ in }
    ) async throws -> URL {
        if let found = directory(for: sha256) { return found }
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        if let files {
            do {
                return try await assemble(sha256, index: files, from: source, attempts: attempts, logger: logger, fetched: fetched)
            } catch {
                logger.warning("fetching bundle \(sha256.prefix(12))… file by file failed (\((error as? SidecarError)?.message ?? "\(error)")); fetching its .tar.gz")
            }
        }
        let data = try await fetchVerified(
            "bundles/\(sha256).tar.gz", sha256: sha256, what: "bundle \(sha256.prefix(12))…", limit: limits.maxCompressedBytes,
            from: source, attempts: attempts, logger: logger, fetched: fetched)
        return try await install(data, sha256: sha256)
    }

    /// `path` from `source`, checked against `sha256`: a truncated or corrupted download is retried
    /// like a failed one, with backoff.
    private func fetchVerified(
        _ path: String, sha256: String, what: String, limit: Int, from source: any RepositorySource, attempts: Int, logger: Logger,
        fetched: (Int) -> Void
    ) async throws -> Data {
        var delay = Duration.milliseconds(500)
        for attempt in 1...max(1, attempts) {
            do {
                let bytes = try await source.fetch(path, limit: limit)
                fetched(bytes.count)
                let actual = BundleArchive.sha256Hex(of: bytes)
                guard actual == sha256 else {
                    throw SidecarError(
                        .invalidInput,
                        "\(what) from \(source.description) has SHA-256 \(actual.prefix(12))… (\(bytes.count) bytes): corrupted or truncated")
                }
                return bytes
            } catch {
                if attempt >= attempts || Task.isCancelled { throw error }
                logger.warning("fetching \(what) failed (attempt \(attempt) of \(attempts)): \(error); retrying in \(delay)")
                try await Task.sleep(for: delay)
                delay *= 2
            }
        }
        throw SidecarError(.unavailable, "\(what) was not fetched")
    }

    /// The bundle made from its file index: each file this node lacks is fetched into `files/`
    /// (checked against its hash), then the model directory is built in a fresh staging directory
    /// (files hard-linked from `files/`, read-only, so a handler cannot change a cached file) and
    /// renamed into place.
    private func assemble(
        _ sha256: String, index indexSHA: String, from source: any RepositorySource, attempts: Int, logger: Logger,
        fetched: (Int) -> Void
    ) async throws -> URL {
        let indexData = try await fetchVerified(
            "bundles/\(sha256).files.json", sha256: indexSHA, what: "the file index of bundle \(sha256.prefix(12))…", limit: 64 << 20,
            from: source, attempts: attempts, logger: logger, fetched: fetched)
        let index = try BundleIndex.decode(indexData, limits: limits)
        try FileManager.default.createDirectory(at: filesURL, withIntermediateDirectories: true)
        for entry in index.entries where entry.kind != .directory {
            guard let fileSHA = entry.sha256, let size = entry.size else { continue }
            let cached = filesURL.appendingPathComponent(fileSHA)
            // A file in the cache was checked when it was stored (and is read-only).
            if (try? FileManager.default.attributesOfItem(atPath: cached.path)[.size] as? Int) == size { continue }
            let data = try await fetchVerified(
                "files/\(fileSHA)", sha256: fileSHA, what: "file '\(entry.path)' of bundle \(sha256.prefix(12))…", limit: size,
                from: source, attempts: attempts, logger: logger, fetched: fetched)
            try RepositoryPublisher.writeAtomically(data, to: cached)
            chmod(cached.path, 0o444)
        }
        let staging = stagingURL(sha256)
        defer { try? FileManager.default.removeItem(at: staging) }
        try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: false)
        for entry in index.entries {
            let target = staging.appendingPathComponent(entry.path)
            // Parents are made here, in a fresh directory that holds no symlink: nothing can lead out.
            try FileManager.default.createDirectory(at: target.deletingLastPathComponent(), withIntermediateDirectories: true)
            switch entry.kind {
            case .directory:
                try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
            case .file:
                guard let fileSHA = entry.sha256, link(filesURL.appendingPathComponent(fileSHA).path, target.path) == 0 else {
                    throw SidecarError(.unavailable, "cannot place '\(entry.path)' of bundle \(sha256.prefix(12))…: \(String(cString: strerror(errno)))")
                }
            case .executable:
                guard let fileSHA = entry.sha256 else { continue }
                try FileManager.default.copyItem(at: filesURL.appendingPathComponent(fileSHA), to: target)
                chmod(target.path, 0o555)
            }
        }
        try RepositoryPublisher.writeAtomically(indexData, to: root.appendingPathComponent("\(sha256).files.json"))
        return try place(staging, as: sha256)
    }

    /// Renames a complete staging directory to the bundle's place; returns its model directory.
    /// Another node sharing this cache may have won the rename: its copy is as good as ours.
    private func place(_ staging: URL, as sha256: String) throws -> URL {
        let unpacked = unpackedURL(sha256)
        if rename(staging.path, unpacked.path) != 0, !FileManager.default.fileExists(atPath: unpacked.path) {
            throw SidecarError(.unavailable, "cannot move the bundle to \(unpacked.path): \(String(cString: strerror(errno)))")
        }
        guard let found = Self.modelDirectory(in: unpacked) else {
            throw SidecarError(.invalidInput, "bundle \(sha256.prefix(12))… holds no model directory (no sidecar.yaml or handler.py)")
        }
        return found
    }

    /// Checks `data` against `sha256` and every rule of ``BundleArchive/unpack(_:sha256:into:limits:)``,
    /// then keeps it (archive and unpacked directory). Returns the model directory.
    public func install(_ data: Data, sha256: String) async throws -> URL {
        guard RepositoryManifest.isSHA256(sha256) else {
            throw SidecarError(.invalidInput, "a bundle is named by its SHA-256 (64 lowercase hex digits), got '\(sha256.prefix(80))'")
        }
        if let found = directory(for: sha256) { return found }
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let staging = stagingURL(sha256)
        defer { try? FileManager.default.removeItem(at: staging) }
        _ = try await BundleArchive.unpack(data, sha256: sha256, into: staging, limits: limits)
        try RepositoryPublisher.writeAtomically(data, to: root.appendingPathComponent("\(sha256).tar.gz"))
        return try place(staging, as: sha256)
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

    /// Removes every bundle not in `keep`, and every cached file no kept bundle lists. Returns how
    /// many bundles went.
    @discardableResult
    func collect(keeping keep: Set<String>, logger: Logger) -> Int {
        guard let children = try? FileManager.default.contentsOfDirectory(atPath: root.path) else { return 0 }
        var removed = Set<String>()
        for child in children {
            var sha = child
            for suffix in [".tar.gz", ".files.json"] where child.hasSuffix(suffix) { sha = String(child.dropLast(suffix.count)) }
            guard RepositoryManifest.isSHA256(sha), !keep.contains(sha) else { continue }
            let url = root.appendingPathComponent(child)
            try? FileManager.default.removeItem(at: url)
            removed.insert(sha)
        }
        var listed = Set<String>()
        for sha in keep {
            guard let data = try? Data(contentsOf: root.appendingPathComponent("\(sha).files.json")),
                let index = try? BundleIndex.decode(data, limits: limits)
            else { continue }
            listed.formUnion(index.entries.compactMap(\.sha256))
        }
        for file in (try? FileManager.default.contentsOfDirectory(atPath: filesURL.path)) ?? [] where RepositoryManifest.isSHA256(file) && !listed.contains(file) {
            try? FileManager.default.removeItem(at: filesURL.appendingPathComponent(file))
        }
        if !removed.isEmpty { logger.info("removed \(removed.count) old bundle(s) from \(root.path)") }
        return removed.count
    }
}
