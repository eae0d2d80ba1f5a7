import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Where a node reads the model repository from: a directory (a Kubernetes volume, NFS, a
/// ConfigMap mount) or an HTTP(S) base URL (any web server or object store, or another Sidecar
/// node's `/repository/`). Both hold `manifest.json` and `bundles/<sha256>.tar.gz`.
public protocol RepositorySource: Sendable {
    /// Where it is, for status and logs.
    var description: String { get }
    /// The manifest, unless it is unchanged since the fetch that returned `tag` (a conditional
    /// request: an unchanged manifest costs a stat or a 304, not a download).
    func manifest(ifChangedFrom tag: String?) async throws -> ManifestFetch
    /// The bytes of a file of the repository (`bundles/<sha256>.tar.gz`, `files/<sha256>`, ...),
    /// at most `limit`; the caller checks them against their hash before use.
    func fetch(_ path: String, limit: Int) async throws -> Data
}

extension RepositorySource {
    /// The bundle's `.tar.gz`.
    public func bundle(sha256: String, limit: Int) async throws -> Data {
        try await fetch("bundles/\(sha256).tar.gz", limit: limit)
    }
}

public enum ManifestFetch: Sendable {
    case unchanged
    case changed(Data, tag: String?)
}

/// The repository in a directory.
public struct DirectoryRepository: RepositorySource {
    public let root: URL

    public init(root: URL) { self.root = root.standardizedFileURL }

    public var description: String { root.path }

    var manifestURL: URL { root.appendingPathComponent("manifest.json") }

    func bundleURL(_ sha256: String) -> URL { root.appendingPathComponent("bundles/\(sha256).tar.gz") }

    public func manifest(ifChangedFrom tag: String?) async throws -> ManifestFetch {
        // The publisher renames a new manifest into place, so a new inode or mtime means a new
        // manifest; the same means nothing to read.
        var info = stat()
        guard stat(manifestURL.path, &info) == 0 else {
            throw SidecarError(.unavailable, "the repository \(root.path) has no readable manifest.json (\(String(cString: strerror(errno))))")
        }
        let stamp = "\(info.st_ino)-\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)-\(info.st_size)"
        if stamp == tag { return .unchanged }
        do {
            return .changed(try Data(contentsOf: manifestURL), tag: stamp)
        } catch {
            throw SidecarError(.unavailable, "cannot read \(manifestURL.path): \(error.localizedDescription)", cause: error)
        }
    }

    public func fetch(_ path: String, limit: Int) async throws -> Data {
        let url = root.appendingPathComponent(path)
        let size = (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int) ?? nil
        guard let size else { throw SidecarError(.unavailable, "the repository has no \(url.path)") }
        guard size <= limit else { throw SidecarError(.invalidInput, "\(path) is \(size) bytes, over the limit of \(limit)") }
        do {
            return try Data(contentsOf: url)
        } catch {
            throw SidecarError(.unavailable, "cannot read \(url.path): \(error.localizedDescription)", cause: error)
        }
    }
}

/// Writes a repository directory: `sidecar publish` and `sidecar rollback`. Every file is written
/// to a temporary name, flushed to disk and renamed into place, so a reader (a node polling, a web
/// server serving it) never sees half a bundle or half a manifest; publishers take a lock so two of
/// them cannot lose each other's change.
public struct RepositoryPublisher: Sendable {
    public let repository: DirectoryRepository

    public init(root: URL) { repository = DirectoryRepository(root: root) }

    /// Packs `directory`, stores its bundle and applies `change` to the manifest (given the bundle's
    /// SHA-256). Returns the manifest written and the bundle's SHA-256.
    public func publish(
        directory: URL?, logger: Logger? = nil,
        _ change: (inout RepositoryManifest, _ bundle: String?) throws -> Void
    ) async throws -> (RepositoryManifest, bundle: String?) {
        let bundles = repository.root.appendingPathComponent("bundles")
        try FileManager.default.createDirectory(at: bundles, withIntermediateDirectories: true)
        var sha: String?
        var indexSHA: String?
        if let directory {
            let (data, sha256) = try await BundleArchive.pack(directory: directory)
            let target = repository.bundleURL(sha256)
            // Content-addressed: an existing file of that name is only kept if it really has that hash.
            let existing = try? Data(contentsOf: target)
            if existing.map({ BundleArchive.sha256Hex(of: $0) }) != sha256 {
                try Self.writeAtomically(data, to: target)
            }
            sha = sha256
            // Each file by its hash too, so nodes fetch only the files a version changed.
            if let (index, files) = try BundleIndex.make(directory: directory) {
                let store = repository.root.appendingPathComponent("files")
                try FileManager.default.createDirectory(at: store, withIntermediateDirectories: true)
                for (fileSHA, source) in files {
                    let target = store.appendingPathComponent(fileSHA)
                    let size = (try? FileManager.default.attributesOfItem(atPath: target.path)[.size] as? Int) ?? nil
                    let data = try Data(contentsOf: source, options: .mappedIfSafe)
                    if size != data.count { try Self.writeAtomically(data, to: target) }
                }
                let encoded = try index.encoded()
                try Self.writeAtomically(encoded, to: bundles.appendingPathComponent("\(sha256).files.json"))
                indexSHA = BundleArchive.sha256Hex(of: encoded)
            }
        }
        let lock = try await FileLock.acquire(repository.root.appendingPathComponent(".publish.lock"), logger: logger ?? Logger(label: "sidecar"))
        defer { lock.release() }
        var manifest = RepositoryManifest()
        if FileManager.default.fileExists(atPath: repository.manifestURL.path) {
            manifest = try RepositoryManifest.decode(try Data(contentsOf: repository.manifestURL))
        }
        try change(&manifest, sha)
        if let sha, let indexSHA {
            // The versions of this bundle name its file index (the chain of trust to each file).
            for (name, var entry) in manifest.models {
                for index in entry.versions.indices where entry.versions[index].bundle == sha { entry.versions[index].files = indexSHA }
                for index in entry.history.indices where entry.history[index].bundle == sha { entry.history[index].files = indexSHA }
                manifest.models[name] = entry
            }
        }
        try manifest.check()
        try Self.writeAtomically(try manifest.encoded(), to: repository.manifestURL)
        return (manifest, sha)
    }

    /// Write to a temporary file beside `url`, fsync it, rename it over `url`, fsync the directory.
    static func writeAtomically(_ data: Data, to url: URL) throws {
        let directory = url.deletingLastPathComponent()
        let temporary = directory.appendingPathComponent(".\(url.lastPathComponent).\(UInt64.random(in: 0...UInt64.max)).tmp")
        let fd = open(temporary.path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SidecarError(.unavailable, "cannot write \(temporary.path): \(String(cString: strerror(errno)))") }
        var failed: String?
        data.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = write(fd, buffer.baseAddress! + offset, buffer.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failed = String(cString: strerror(errno))
                    return
                }
                offset += written
            }
        }
        if failed == nil, fsync(fd) != 0 { failed = String(cString: strerror(errno)) }
        close(fd)
        if let failed {
            unlink(temporary.path)
            throw SidecarError(.unavailable, "cannot write \(url.path): \(failed)")
        }
        guard rename(temporary.path, url.path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary.path)
            throw SidecarError(.unavailable, "cannot rename \(temporary.path) to \(url.path): \(reason)")
        }
        let dirfd = open(directory.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirfd >= 0 {
            fsync(dirfd)
            close(dirfd)
        }
    }
}
