import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A bundle's files, each by its SHA-256, so that a node fetches only the files it lacks: a new
/// version that changes only `handler.py` moves the handler, not the weights beside it. The
/// repository keeps `files/<sha256>` (each file's bytes) and `bundles/<bundle>.files.json` (this
/// index); the manifest names the index's own SHA-256 (`files`), so the chain of trust runs from the
/// manifest to every byte, as it does for a whole `.tar.gz`.
///
/// Only regular files and directories: a model directory holding a symlink gets no index, and nodes
/// fetch its `.tar.gz` (whose links ``BundleArchive`` checks).
public struct BundleIndex: Codable, Sendable, Equatable {
    public var format = 1
    public var entries: [Entry]

    public struct Entry: Codable, Sendable, Equatable {
        public enum Kind: String, Codable, Sendable { case file, executable, directory }
        public var path: String
        public var kind: Kind
        public var sha256: String?
        public var size: Int?
    }

    /// The index of `directory` (`__pycache__` left out, as in the `.tar.gz`) and each file's URL by
    /// hash; nil when it holds anything but regular files and directories.
    static func make(directory: URL) throws -> (index: BundleIndex, files: [String: URL])? {
        let root = directory.standardizedFileURL
        var entries: [Entry] = []
        var files: [String: URL] = [:]
        func walk(_ url: URL, _ relative: String) throws -> Bool {
            let names = try FileManager.default.contentsOfDirectory(atPath: url.path).sorted()
            for name in names where name != "__pycache__" {
                let child = url.appendingPathComponent(name)
                let path = relative.isEmpty ? name : relative + "/" + name
                var info = stat()
                guard lstat(child.path, &info) == 0 else { return false }
                switch info.st_mode & S_IFMT {
                case S_IFDIR:
                    entries.append(Entry(path: path, kind: .directory))
                    guard try walk(child, path) else { return false }
                case S_IFREG:
                    let data = try Data(contentsOf: child, options: .mappedIfSafe)
                    let sha = BundleArchive.sha256Hex(of: data)
                    files[sha] = child
                    entries.append(Entry(path: path, kind: info.st_mode & 0o100 != 0 ? .executable : .file, sha256: sha, size: data.count))
                default:
                    return false
                }
            }
            return true
        }
        guard try walk(root, "") else { return nil }
        return (BundleIndex(entries: entries), files)
    }

    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try encoder.encode(self)
    }

    /// Reads an index and checks every entry before anything is written: relative paths without
    /// `.`/`..`/empty parts, no path twice, a hash and a size for every file, and the totals within
    /// the bundle limits.
    static func decode(_ data: Data, limits: BundleArchive.Limits) throws -> BundleIndex {
        func refuse(_ reason: String) -> SidecarError {
            SidecarError(.invalidInput, "bundle file index refused: \(reason); nothing was written")
        }
        let index: BundleIndex
        do {
            index = try JSONDecoder().decode(BundleIndex.self, from: data)
        } catch {
            throw refuse("not a valid index (\(error))")
        }
        guard index.format == 1 else { throw refuse("format \(index.format) is not 1") }
        guard index.entries.count <= limits.maxEntries else { throw refuse("\(index.entries.count) entries, over the limit of \(limits.maxEntries)") }
        var seen = Set<String>()
        var total = 0
        for entry in index.entries {
            let parts = entry.path.split(separator: "/", omittingEmptySubsequences: false)
            guard !entry.path.isEmpty, entry.path.utf8.count <= 4096, !entry.path.hasPrefix("/"), !entry.path.contains("\0"),
                parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." })
            else {
                throw refuse("entry '\(entry.path.prefix(200))' is not a plain relative path")
            }
            guard seen.insert(entry.path).inserted else { throw refuse("entry '\(entry.path.prefix(200))' appears twice") }
            if entry.kind != .directory {
                guard let sha = entry.sha256, RepositoryManifest.isSHA256(sha), let size = entry.size, size >= 0 else {
                    throw refuse("file '\(entry.path.prefix(200))' lacks its sha256 or size")
                }
                guard let sum = Checked.add(total, size), sum <= limits.maxUnpackedBytes else {
                    throw refuse("its files hold more than \(limits.maxUnpackedBytes) bytes")
                }
                total = sum
            }
        }
        return index
    }
}
