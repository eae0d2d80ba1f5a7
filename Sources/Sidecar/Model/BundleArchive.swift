import Crypto
import Foundation
import Subprocess

#if canImport(System)
import System
#else
import SystemPackage
#endif

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A model bundle as it travels: a `.tar.gz` of a model directory, sent with the SHA-256 of its bytes.
///
/// `unpack` checks everything before it writes anything: the size and SHA-256 of the upload, then the
/// whole decompressed tar stream (bounded, so a gzip bomb stops at the limit) and every entry in it —
/// no absolute paths, no `..`, no links that leave the bundle, no devices or FIFOs, nothing inside a
/// symlink. Only then does it decompress a second time and write, into the caller's fresh staging
/// directory, never following a symlink. Refusals are ``SidecarError``s with code `invalidInput`
/// whose message names the reason and the entry.
///
/// The tar format is read here (POSIX ustar, GNU long names, pax `path`/`linkpath`/`size`), so what
/// is checked is exactly what is written. Decompression runs `gzip -dc` (the package graph offers
/// Sidecar no zlib module), reading from an in-memory file and never more than the limit.
public enum BundleArchive {
    public struct Limits: Sendable, Equatable {
        /// Most bytes of the upload itself (the `.tar.gz`).
        public var maxCompressedBytes: Int
        /// Most bytes of the decompressed tar stream (headers, contents and padding).
        public var maxUnpackedBytes: Int
        /// Most entries (files, directories, links) in the bundle.
        public var maxEntries: Int

        public init(maxCompressedBytes: Int = 256 << 20, maxUnpackedBytes: Int = 2 << 30, maxEntries: Int = 100_000) {
            self.maxCompressedBytes = maxCompressedBytes
            self.maxUnpackedBytes = maxUnpackedBytes
            self.maxEntries = maxEntries
        }
    }

    /// Checks `archive` (a `.tar.gz`) against `sha256` (hex, of the compressed bytes) and `limits`,
    /// then unpacks it into `staging`, which must not exist yet (it is created, with its parents) or
    /// be an empty directory. Returns the model directory: `staging` itself when the bundle holds
    /// `handler.py` or `sidecar.yaml` at its root, else its single top-level directory (a bundle made
    /// by `tar czf m.tgz mymodel/`), else `staging`.
    ///
    /// Throws `SidecarError(.invalidInput)` for a bundle that is refused (nothing is written, not even
    /// `staging`), and `SidecarError(.loadFailed)` when `staging` is unusable or writing fails (what
    /// was written is removed).
    public static func unpack(_ archive: Data, sha256: String, into staging: URL, limits: Limits = Limits()) async throws -> URL {
        let staging = staging.standardizedFileURL
        let stagingExisted = try checkStaging(staging)
        do {
            try checkUpload(archive, sha256: sha256, limits: limits)
        } catch let refusal as Refusal {
            throw refusal.unpackError
        }
        let input = try SealedInput(archive)

        // Pass 1: read the whole stream, check every entry; nothing is written.
        let entries: [Entry]
        do {
            entries = try await gunzip(input, limit: limits.maxUnpackedBytes) { reader in
                var validator = Validator(limits: limits)
                while let raw = try await reader.next() { _ = try validator.add(raw) }
                try validator.finish()
                return validator.entries
            }
        } catch let refusal as Refusal {
            throw refusal.unpackError
        }

        // Pass 2: decompress again and write what pass 1 accepted, entry by entry.
        if !stagingExisted {
            do {
                try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
            } catch {
                throw SidecarError(.loadFailed, "cannot create the staging directory \(staging.path): \(error.localizedDescription)")
            }
        }
        do {
            let writer = try StagingWriter(root: staging)
            defer { writer.close() }
            try await gunzip(input, limit: limits.maxUnpackedBytes) { reader in
                var check = Validator(limits: limits)
                var next = 0
                while let raw = try await reader.next() {
                    guard let entry = try check.add(raw) else { continue }
                    guard next < entries.count, entries[next] == entry else {
                        throw Refusal("changed between its check and its unpacking", kind: .structural)
                    }
                    next += 1
                    switch entry.kind {
                    case .directory:
                        try writer.makeDirectory(entry.path)
                    case .file(let executable):
                        let fd = try writer.createFile(entry.path, executable: executable)
                        defer { _ = closeDescriptor(fd) }
                        try await reader.readContent { bytes in try writeAll(fd, bytes, path: entry.name) }
                    case .symlink(let target):
                        try writer.makeSymlink(entry.path, target: target)
                    case .hardlink(let target):
                        try writer.makeHardLink(entry.path, to: target)
                    }
                }
                guard next == entries.count else {
                    throw Refusal("changed between its check and its unpacking", kind: .structural)
                }
            }
        } catch {
            removeUnpacked(staging, existed: stagingExisted)
            if let refusal = error as? Refusal { throw refusal.unpackError }
            if let error = error as? SidecarError { throw error }
            throw SidecarError(.loadFailed, "could not unpack the bundle into \(staging.path): \(error); nothing was kept")
        }
        return modelDirectory(in: staging, entries: entries)
    }

    /// Packs the model directory `directory` into a `.tar.gz` for upload (`__pycache__` left out) and
    /// returns it with its hex SHA-256. The result is checked the way `unpack` checks it, so a
    /// directory a server would refuse (a symlink out of it, a FIFO, too large) fails here, naming
    /// the file.
    public static func pack(directory: URL, limits: Limits = Limits()) async throws -> (data: Data, sha256: String) {
        let directory = directory.standardizedFileURL
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw SidecarError(.invalidModel, "\(directory.path): no such directory; pass the model directory that holds handler.py")
        }
        var arguments = ["--exclude=__pycache__"]
        #if os(Linux)
        // GNU tar: entries in a stable order, without the packer's user and group names.
        arguments += ["--sort=name", "--owner=0", "--group=0", "--numeric-owner"]
        #endif
        arguments += ["-czf", "-", "-C", directory.path, "."]
        let limit = limits.maxCompressedBytes
        let packed: Data?
        let status: TerminationStatus
        let errorOutput: String
        do {
            let result = try await Subprocess.run(
                .path(FilePath(try tool("tar"))),
                arguments: Arguments(arguments),
                environment: .inherit.updating(["COPYFILE_DISABLE": "1"]),  // no AppleDouble files from macOS tar
                input: .none,
                output: .sequence,
                error: .string(limit: 1 << 16)
            ) { execution -> Data? in
                var data = Data()
                for try await buffer in execution.standardOutput {
                    guard data.count + buffer.count <= limit else {
                        try? execution.send(signal: .kill)
                        return nil
                    }
                    buffer.withUnsafeBytes { data.append(contentsOf: $0) }
                }
                return data
            }
            packed = result.closureResult
            status = result.terminationStatus
            errorOutput = result.standardError
        } catch let error as SidecarError {
            throw error
        } catch {
            throw SidecarError(.loadFailed, "could not run tar to pack \(directory.path): \(error)")
        }
        guard let data = packed else {
            throw SidecarError(
                .invalidModel,
                "\(directory.path) compresses to more than \(byteCount(limit)), the limit for a bundle; leave large files out of the model directory")
        }
        guard status.isSuccess else {
            let detail = errorOutput.split(separator: "\n").last.map(String.init) ?? "\(status)"
            throw SidecarError(.invalidModel, "tar could not pack \(directory.path): \(detail)")
        }
        do {
            _ = try await gunzip(try SealedInput(data), limit: limits.maxUnpackedBytes) { reader in
                var validator = Validator(limits: limits)
                while let raw = try await reader.next() { _ = try validator.add(raw) }
                try validator.finish()
                return validator.entries.count
            }
        } catch let refusal as Refusal {
            throw SidecarError(.invalidModel, "\(directory.path): the bundle \(refusal.reason); a server would refuse it")
        }
        return (data, sha256Hex(of: data))
    }

    /// The lowercase hex SHA-256 of `data`, as `unpack` expects it.
    public static func sha256Hex(of data: Data) -> String {
        SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}

// MARK: - Checks before decompressing

extension BundleArchive {
    /// Why a bundle is refused. `reason` reads after "bundle " ("entry 'x' is a FIFO", "is not ...").
    struct Refusal: Error, CustomStringConvertible {
        enum Kind {
            /// An entry or the upload is not acceptable; stop reading at once.
            case content
            /// The stream is not a well-formed tar: maybe because gzip failed, which it then reports.
            case structural
            /// The decompressed stream passed the limit.
            case overflow
        }
        var reason: String
        var kind: Kind

        init(_ reason: String, kind: Kind = .content) {
            self.reason = reason
            self.kind = kind
        }

        static func entry(_ name: String, _ problem: String) -> Refusal {
            Refusal("entry '\(displayName(name))' \(problem)")
        }

        var description: String { "bundle \(reason)" }
        var unpackError: SidecarError { SidecarError(.invalidInput, "bundle \(reason); nothing was unpacked") }
    }

    static func checkUpload(_ archive: Data, sha256: String, limits: Limits) throws {
        guard archive.count <= limits.maxCompressedBytes else {
            throw Refusal("is \(byteCount(archive.count)), over the limit of \(byteCount(limits.maxCompressedBytes)) for an upload")
        }
        var expected = sha256.trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
        if expected.hasPrefix("sha256:") { expected.removeFirst("sha256:".count) }
        guard expected.count == 64, expected.allSatisfy({ $0.isHexDigit && $0.isASCII }) else {
            throw Refusal("sha256 '\(displayName(sha256))' is not 64 hexadecimal digits")
        }
        let actual = sha256Hex(of: archive)
        guard actual == expected else {
            throw Refusal("sha256 does not match: expected \(expected), the upload's is \(actual) (damaged or incomplete upload?)")
        }
    }

    /// Returns whether `staging` already exists (as an empty directory that is not a symlink).
    static func checkStaging(_ staging: URL) throws -> Bool {
        var info = stat()
        guard lstat(staging.path, &info) == 0 else {
            if errno == ENOENT { return false }
            throw SidecarError(.loadFailed, "cannot use the staging directory \(staging.path): \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            throw SidecarError(.loadFailed, "the staging directory \(staging.path) exists and is not a directory; pass a fresh path")
        }
        let contents = (try? FileManager.default.contentsOfDirectory(atPath: staging.path)) ?? ["?"]
        guard contents.isEmpty else {
            throw SidecarError(.loadFailed, "the staging directory \(staging.path) is not empty; pass a fresh path")
        }
        return true
    }

    static func removeUnpacked(_ staging: URL, existed: Bool) {
        if !existed {
            try? FileManager.default.removeItem(at: staging)
            return
        }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: staging.path)) ?? [] {
            try? FileManager.default.removeItem(at: staging.appendingPathComponent(name))
        }
    }

    /// `staging` when its root holds handler.py or sidecar.yaml; else its one top-level directory.
    static func modelDirectory(in staging: URL, entries: [Entry]) -> URL {
        let top = Set(entries.compactMap(\.path.first))
        let atRoot = entries.filter { $0.path.count == 1 }
        if atRoot.contains(where: { $0.path == ["handler.py"] || $0.path == ["sidecar.yaml"] }) { return staging }
        guard top.count == 1, let only = top.first else { return staging }
        if let explicit = atRoot.first(where: { $0.path == [only] }), explicit.kind != .directory { return staging }
        return staging.appendingPathComponent(only, isDirectory: true)
    }

    static func byteCount(_ n: Int) -> String {
        if n >= 1 << 30, n % (1 << 30) == 0 { return "\(n >> 30) GiB" }
        if n >= 1 << 20, n % (1 << 20) == 0 { return "\(n >> 20) MiB" }
        if n >= 1 << 20 { return String(format: "%.1f MiB", Double(n) / Double(1 << 20)) }
        if n >= 1 << 10, n % (1 << 10) == 0 { return "\(n >> 10) KiB" }
        return "\(n) bytes"
    }

    /// A name as it can be shown on one line: control characters replaced, very long names cut.
    static func displayName(_ name: String) -> String {
        var shown = String(String.UnicodeScalarView(name.unicodeScalars.map { $0.properties.generalCategory == .control ? "?" : $0 }))
        if shown.count > 200 { shown = String(shown.prefix(200)) + "…" }
        return shown
    }
}

// MARK: - Entries and their checks

extension BundleArchive {
    struct Entry: Equatable, Sendable {
        enum Kind: Equatable, Sendable {
            case file(executable: Bool)
            case directory
            /// The target exactly as stored (relative, checked to stay inside).
            case symlink(String)
            /// The target's path components from the bundle root.
            case hardlink([String])
        }
        /// Path components from the bundle root; never empty, never "." or "..".
        var path: [String]
        /// The name as stored in the archive, for messages.
        var name: String
        var kind: Kind
    }

    /// Checks entries one by one as they stream past, then the links and nesting of the whole tree.
    struct Validator {
        let limits: Limits
        private(set) var entries: [Entry] = []
        private var index: [String: Int] = [:]

        init(limits: Limits) { self.limits = limits }

        /// Checks `raw` and returns the entry to write, or nil for one that needs nothing written (the
        /// root directory, a directory listed again).
        mutating func add(_ raw: RawEntry) throws -> Entry? {
            let path = try Self.components(raw.name, of: raw.name, escaping: "escapes the bundle")
            let kind: Entry.Kind
            switch raw.typeflag {
            case UInt8(ascii: "0"), 0, UInt8(ascii: "7"):
                kind = .file(executable: raw.mode & 0o111 != 0)
            case UInt8(ascii: "5"):
                kind = .directory
            case UInt8(ascii: "2"):
                let target = raw.linkname
                guard !target.isEmpty else { throw Refusal.entry(raw.name, "is a symlink with an empty target") }
                guard !target.hasPrefix("/") else {
                    throw Refusal.entry(raw.name, "is a symlink to '\(displayName(target))', outside the bundle (absolute target)")
                }
                kind = .symlink(target)
            case UInt8(ascii: "1"):
                let target = try Self.components(
                    raw.linkname, of: raw.name, escaping: "is a hard link to '\(displayName(raw.linkname))', outside the bundle")
                guard let found = index[target.joined(separator: "/")], case .file = entries[found].kind else {
                    throw Refusal.entry(raw.name, "is a hard link to '\(displayName(raw.linkname))', which is not a regular file earlier in the bundle")
                }
                kind = .hardlink(target)
            case UInt8(ascii: "3"): throw Refusal.entry(raw.name, "is a character device\(Self.allowed)")
            case UInt8(ascii: "4"): throw Refusal.entry(raw.name, "is a block device\(Self.allowed)")
            case UInt8(ascii: "6"): throw Refusal.entry(raw.name, "is a FIFO\(Self.allowed)")
            default:
                let flag = raw.typeflag >= 0x21 && raw.typeflag < 0x7f ? "'\(Character(Unicode.Scalar(raw.typeflag)))'" : "\(raw.typeflag)"
                let what = Self.typeNames[raw.typeflag].map { " (\($0))" } ?? ""
                throw Refusal.entry(raw.name, "has tar entry type \(flag)\(what), which a bundle may not hold\(Self.allowed)")
            }
            if raw.size != 0, kind.isFile == false {
                throw Refusal.entry(raw.name, "is a directory or link but carries \(raw.size) bytes of data (damaged tar)")
            }
            if path.isEmpty {
                guard kind == .directory else { throw Refusal.entry(raw.name, "is the bundle's root but not a directory") }
                return nil
            }
            let key = path.joined(separator: "/")
            if let previous = index[key] {
                if kind == .directory, entries[previous].kind == .directory { return nil }
                throw Refusal.entry(raw.name, "appears twice in the bundle")
            }
            guard entries.count < limits.maxEntries else {
                throw Refusal("has more than \(limits.maxEntries) entries, the limit")
            }
            let entry = Entry(path: path, name: raw.name, kind: kind)
            index[key] = entries.count
            entries.append(entry)
            return entry
        }

        /// The checks that need the whole tree: nothing lies inside a symlink or a file, and every
        /// symlink, followed through the bundle's other symlinks, stays inside.
        func finish() throws {
            // Structural: gzip output that stops at once (not gzip at all) looks like this too.
            guard !entries.isEmpty else { throw Refusal("holds no files (an empty tar archive)", kind: .structural) }
            for entry in entries {
                for depth in 1..<max(1, entry.path.count) {
                    let prefix = entry.path[..<depth].joined(separator: "/")
                    guard let found = index[prefix] else { continue }
                    switch entries[found].kind {
                    case .directory: continue
                    case .symlink: throw Refusal.entry(entry.name, "lies inside the symlink '\(displayName(entries[found].name))'")
                    case .file, .hardlink: throw Refusal.entry(entry.name, "lies inside '\(displayName(entries[found].name))', which is not a directory")
                    }
                }
                if case .symlink(let target) = entry.kind {
                    try resolve(symlink: entry, target: target)
                }
            }
        }

        /// Follows `target` from the symlink's directory through the bundle's own symlinks; refuses
        /// when it climbs above the root or takes more than 40 links.
        private func resolve(symlink: Entry, target: String) throws {
            var location = Array(symlink.path.dropLast())
            var pending = ArraySlice(target.split(separator: "/", omittingEmptySubsequences: true).map(String.init))
            var hops = 0
            while let component = pending.first {
                pending = pending.dropFirst()
                switch component {
                case ".": continue
                case "..":
                    guard !location.isEmpty else {
                        throw Refusal.entry(symlink.name, "is a symlink to '\(displayName(target))', which resolves outside the bundle")
                    }
                    location.removeLast()
                default:
                    location.append(component)
                    guard let found = index[location.joined(separator: "/")], case .symlink(let next) = entries[found].kind else { continue }
                    hops += 1
                    guard hops <= 40 else { throw Refusal.entry(symlink.name, "is a symlink loop") }
                    guard !next.hasPrefix("/") else {
                        throw Refusal.entry(symlink.name, "is a symlink to '\(displayName(target))', which resolves outside the bundle")
                    }
                    location.removeLast()
                    pending = ArraySlice(next.split(separator: "/", omittingEmptySubsequences: true).map(String.init)) + pending
                }
            }
        }

        /// The components of a stored path, refusing absolute paths and `..`.
        static func components(_ path: String, of entry: String, escaping subject: String) throws -> [String] {
            guard !path.hasPrefix("/") else { throw Refusal.entry(entry, "\(subject) (absolute path)") }
            var components: [String] = []
            for part in path.split(separator: "/", omittingEmptySubsequences: true) {
                if part == "." { continue }
                if part == ".." { throw Refusal.entry(entry, "\(subject) (path contains '..')") }
                guard part.utf8.count <= 255 else { throw Refusal.entry(entry, "has a path component longer than 255 bytes") }
                components.append(String(part))
            }
            guard path.utf8.count <= 4000 else { throw Refusal.entry(entry, "has a path longer than 4000 bytes") }
            return components
        }

        static let allowed = "; a bundle may hold only regular files, directories and symlinks that stay inside it"
        static let typeNames: [UInt8: String] = [
            UInt8(ascii: "S"): "GNU sparse file", UInt8(ascii: "V"): "volume label", UInt8(ascii: "M"): "multi-volume continuation",
            UInt8(ascii: "N"): "old GNU long name", UInt8(ascii: "D"): "GNU dump directory", UInt8(ascii: "A"): "Solaris ACL",
            UInt8(ascii: "X"): "Solaris extended header", UInt8(ascii: "I"): "inode metadata",
        ]
    }
}

extension BundleArchive.Entry.Kind {
    var isFile: Bool { if case .file = self { return true }; return false }
}

// MARK: - The tar stream

extension BundleArchive {
    /// One tar entry's header, with GNU long names and pax overrides applied.
    struct RawEntry {
        var name: String
        var linkname: String
        var typeflag: UInt8
        var mode: Int
        var size: Int
    }

    /// Reads tar entries from a byte stream. After `next()` returns a regular file, `readContent` may
    /// take its bytes; otherwise the next `next()` skips them.
    struct TarReader {
        var source: ByteSource
        private var remaining = 0
        private var padding = 0
        private var ended = false
        static let metadataLimit = 1 << 20

        init(source: ByteSource) { self.source = source }

        mutating func next() async throws -> RawEntry? {
            guard !ended else { return nil }
            try await source.skip(remaining + padding)
            remaining = 0
            padding = 0
            var longName: String?
            var longLink: String?
            var pax: [String: String] = [:]
            while true {
                let offset = source.consumed
                guard let header = try await source.read(512) else {
                    guard longName == nil, longLink == nil, pax.isEmpty else {
                        throw Refusal("is a truncated tar archive: it ends after an extended header", kind: .structural)
                    }
                    ended = true
                    return nil
                }
                if header.allSatisfy({ $0 == 0 }) {
                    ended = true
                    return nil
                }
                try Self.checkChecksum(header, offset: offset)
                let typeflag = header[156]
                guard let size = Self.number(header[124..<136]) else {
                    throw Refusal("is a damaged tar archive: bad size field in the header at byte \(offset)", kind: .structural)
                }
                switch typeflag {
                case UInt8(ascii: "L"), UInt8(ascii: "K"), UInt8(ascii: "x"), UInt8(ascii: "g"):
                    guard size <= Self.metadataLimit else {
                        throw Refusal("has an extended tar header of \(size) bytes at byte \(offset), over the limit of 1 MiB")
                    }
                    var content: [UInt8] = []
                    content.reserveCapacity(size)
                    try await source.consume(size) { content.append(contentsOf: $0) }
                    try await source.skip(Self.padding(size))
                    switch typeflag {
                    case UInt8(ascii: "L"): longName = try Self.string(content, what: "GNU long name", offset: offset)
                    case UInt8(ascii: "K"): longLink = try Self.string(content, what: "GNU long link name", offset: offset)
                    case UInt8(ascii: "x"): pax.merge(try Self.paxRecords(content, offset: offset)) { $1 }
                    default: break  // global pax header: nothing in it changes what is written
                    }
                    continue
                default:
                    break
                }
                let magic = Array(header[257..<262])
                let posix = magic == Array("ustar".utf8) && header[262] == 0
                var name = try Self.string(header[0..<100], what: "name", offset: offset)
                if posix {
                    let prefix = try Self.string(header[345..<500], what: "name prefix", offset: offset)
                    if !prefix.isEmpty { name = prefix + "/" + name }
                }
                if let longName { name = longName }
                if let path = pax["path"] { name = path }
                var linkname = try Self.string(header[157..<257], what: "link name", offset: offset)
                if let longLink { linkname = longLink }
                if let path = pax["linkpath"] { linkname = path }
                var entrySize = size
                if let text = pax["size"] {
                    guard let value = Int(text), value >= 0 else {
                        throw Refusal("is a damaged tar archive: bad pax size '\(displayName(text))' at byte \(offset)", kind: .structural)
                    }
                    entrySize = value
                }
                guard !name.isEmpty else { throw Refusal("has an entry with an empty name at byte \(offset)") }
                guard let mode = Self.number(header[100..<108]) else {
                    throw Refusal("is a damaged tar archive: bad mode field in the header at byte \(offset)", kind: .structural)
                }
                // Links, directories and devices carry no data in a tar stream even when the header
                // says otherwise; the validator refuses such headers.
                remaining = entrySize
                padding = Self.padding(entrySize)
                return RawEntry(name: name, linkname: linkname, typeflag: typeflag, mode: mode, size: entrySize)
            }
        }

        /// Hands the current entry's bytes to `sink`, in pieces.
        mutating func readContent(_ sink: (UnsafeRawBufferPointer) throws -> Void) async throws {
            try await source.consume(remaining, into: sink)
            remaining = 0
        }

        /// Reads what is left of the stream (tar pads to 10 KiB records), still bounded by the limit.
        mutating func drain() async throws {
            try await source.drain()
        }

        static func padding(_ size: Int) -> Int { (512 - size % 512) % 512 }

        static func checkChecksum(_ header: [UInt8], offset: Int) throws {
            var unsigned = 0
            var signed = 0
            for (i, byte) in header.enumerated() {
                let value = (148..<156).contains(i) ? 0x20 : byte
                unsigned += Int(value)
                signed += Int(Int8(bitPattern: value))
            }
            guard let stored = number(header[148..<156]), stored == unsigned || stored == signed else {
                if offset == 0 {
                    throw Refusal("is not a tar archive (it is gzip data, but its first 512 bytes are not a tar header)", kind: .structural)
                }
                throw Refusal("is a damaged tar archive: the header at byte \(offset) has a bad checksum", kind: .structural)
            }
        }

        /// An octal field (NUL or space terminated), or GNU base-256 for large values.
        static func number(_ field: ArraySlice<UInt8>) -> Int? {
            guard let first = field.first else { return 0 }
            if first & 0x80 != 0 {
                guard first == 0x80 else { return nil }  // 0xff: negative
                var value = 0
                for byte in field.dropFirst() {
                    guard value <= (Int.max >> 8) else { return nil }
                    value = value << 8 | Int(byte)
                }
                return value
            }
            var value = 0
            var started = false
            for byte in field {
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "7"):
                    guard value <= (Int.max >> 3) else { return nil }
                    value = value << 3 | Int(byte - UInt8(ascii: "0"))
                    started = true
                case UInt8(ascii: " ") where !started: continue
                case 0, UInt8(ascii: " "): return value
                default: return nil
                }
            }
            return value
        }

        /// A NUL-terminated UTF-8 field.
        static func string(_ bytes: some Collection<UInt8>, what: String, offset: Int) throws -> String {
            let used = bytes.prefix { $0 != 0 }
            guard let text = String(validating: used, as: UTF8.self) else {
                throw Refusal("has an entry whose \(what) is not valid UTF-8, in the header at byte \(offset)")
            }
            return text
        }

        /// Pax records: "LENGTH KEY=VALUE\n", LENGTH counting the whole record.
        static func paxRecords(_ content: [UInt8], offset: Int) throws -> [String: String] {
            var records: [String: String] = [:]
            var position = 0
            let bad = Refusal("is a damaged tar archive: malformed pax header at byte \(offset)", kind: .structural)
            while position < content.count {
                if content[position] == 0 { break }  // some writers pad with NULs
                guard let space = content[position...].firstIndex(of: UInt8(ascii: " ")), space - position <= 20,
                    let length = Int(String(decoding: content[position..<space], as: UTF8.self)),
                    length > space - position + 1, position + length <= content.count,
                    content[position + length - 1] == UInt8(ascii: "\n")
                else { throw bad }
                let record = content[(space + 1)..<(position + length - 1)]
                guard let equals = record.firstIndex(of: UInt8(ascii: "=")) else { throw bad }
                guard let key = String(validating: record[..<equals], as: UTF8.self) else { throw bad }
                let valueBytes = record[(equals + 1)...]
                if ["path", "linkpath", "size"].contains(key) {
                    guard !valueBytes.contains(0), let value = String(validating: valueBytes, as: UTF8.self) else {
                        throw Refusal("has an entry whose pax \(key) is not valid UTF-8 text, in the header at byte \(offset)")
                    }
                    records[key] = value
                }
                position += length
            }
            return records
        }
    }

    /// The decompressed bytes, as they arrive from gzip, counted against the limit.
    struct ByteSource {
        private var iterator: SubprocessOutputSequence.Iterator
        private var chunk: [UInt8] = []
        private var position = 0
        private var finished = false
        /// Bytes received from gzip.
        private(set) var received = 0
        /// Bytes handed out or skipped.
        private(set) var consumed = 0
        let limit: Int

        init(iterator: SubprocessOutputSequence.Iterator, limit: Int) {
            self.iterator = iterator
            self.limit = limit
        }

        /// Gets the next piece from gzip; false at the end of the stream.
        private mutating func fill() async throws -> Bool {
            while !finished {
                guard let buffer = try await iterator.next() else {
                    finished = true
                    return false
                }
                if buffer.isEmpty { continue }
                received += buffer.count
                guard received <= limit else {
                    throw Refusal("decompresses to more than \(byteCount(limit)), the limit", kind: .overflow)
                }
                chunk = buffer.withUnsafeBytes { Array($0) }
                position = 0
                return true
            }
            return false
        }

        /// Exactly `count` bytes, or nil when the stream ends before the first of them.
        mutating func read(_ count: Int) async throws -> [UInt8]? {
            if position == chunk.count, !(try await fill()) { return nil }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(count)
            try await consume(count) { bytes.append(contentsOf: $0) }
            return bytes
        }

        mutating func skip(_ count: Int) async throws {
            try await consume(count) { _ in }
        }

        /// Passes the next `count` bytes to `sink`, in pieces.
        mutating func consume(_ count: Int, into sink: (UnsafeRawBufferPointer) throws -> Void) async throws {
            var left = count
            while left > 0 {
                if position == chunk.count {
                    guard try await fill() else {
                        throw Refusal("is a truncated tar archive (it ends inside an entry, at byte \(consumed))", kind: .structural)
                    }
                }
                let start = position
                let take = min(left, chunk.count - start)
                try chunk.withUnsafeBytes { try sink(UnsafeRawBufferPointer(rebasing: $0[start..<(start + take)])) }
                position += take
                consumed += take
                left -= take
            }
        }

        mutating func drain() async throws {
            position = chunk.count
            while try await fill() { position = chunk.count }
        }
    }
}

// MARK: - gzip

extension BundleArchive {
    private enum Pass<Value: Sendable>: Sendable {
        case done(Value)
        case failed(any Error, killed: Bool)
    }

    /// Runs `gzip -dc` on `input` and hands its output to `body` as a tar stream, never reading more
    /// than `limit` bytes (gzip is killed at the limit). A refusal of the content stops gzip at once;
    /// a malformed stream is blamed on gzip when gzip failed.
    static func gunzip<Value: Sendable>(
        _ input: SealedInput, limit: Int, _ body: (inout TarReader) async throws -> Value
    ) async throws -> Value {
        let gzip = try tool("gzip")
        let descriptor = try input.descriptorForChild()
        let pass: Pass<Value>
        let status: TerminationStatus
        let errorOutput: String
        do {
            let result = try await Subprocess.run(
                .path(FilePath(gzip)),
                arguments: ["-dc"],
                input: .fileDescriptor(FileDescriptor(rawValue: descriptor), closeAfterSpawningProcess: true),
                output: .sequence,
                error: .string(limit: 1 << 16)
            ) { execution -> Pass<Value> in
                var reader = TarReader(source: ByteSource(iterator: execution.standardOutput.makeAsyncIterator(), limit: limit))
                do {
                    let value = try await body(&reader)
                    try await reader.drain()
                    return .done(value)
                } catch let refusal as Refusal where refusal.kind == .structural {
                    // Perhaps gzip failed half-way; let it finish so that its message can be used.
                    do { try await reader.drain() } catch {
                        try? execution.send(signal: .kill)
                        return .failed(error, killed: true)
                    }
                    return .failed(refusal, killed: false)
                } catch {
                    try? execution.send(signal: .kill)
                    return .failed(error, killed: true)
                }
            }
            pass = result.closureResult
            status = result.terminationStatus
            errorOutput = result.standardError
        } catch {
            throw SidecarError(.loadFailed, "could not run \(gzip) to decompress the bundle: \(error)")
        }
        // gzip: 0 success, 1 error, 2 warning (such as trailing garbage after the data).
        var gzipFailed: Refusal?
        if status != .exited(0), status != .exited(2) {
            let message = errorOutput.split(separator: "\n").last.map { String($0) } ?? "\(status)"
            gzipFailed = Refusal("is not valid gzip data (\(message.trimmingCharacters(in: .whitespaces)))")
        }
        switch pass {
        case .done(let value):
            if let gzipFailed { throw gzipFailed }
            return value
        case .failed(let error, let killed):
            if !killed, let gzipFailed { throw gzipFailed }
            throw error
        }
    }

    /// The absolute path of a system tool (never looked up on PATH).
    static func tool(_ name: String) throws -> String {
        for directory in ["/bin", "/usr/bin"] where FileManager.default.isExecutableFile(atPath: "\(directory)/\(name)") {
            return "\(directory)/\(name)"
        }
        throw SidecarError(.loadFailed, "\(name) not found in /bin or /usr/bin; it is needed to handle model bundles")
    }

    /// The upload in an anonymous in-memory file (Linux `memfd`; elsewhere an unlinked temporary
    /// file), so that gzip reads it as a file: feeding a pipe instead could raise SIGPIPE in this
    /// process when gzip stops early.
    final class SealedInput {
        let fd: Int32

        init(_ data: Data) throws {
            var fd: Int32 = -1
            #if os(Linux)
            typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
            if let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create") {  // RTLD_DEFAULT
                fd = unsafeBitCast(symbol, to: MemfdCreate.self)("sidecar-bundle", 1)  // MFD_CLOEXEC
            }
            #endif
            if fd < 0 {
                var template = Array("\(NSTemporaryDirectory())/sidecar-bundle-XXXXXX".utf8CString)
                fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
                if fd >= 0 { _ = template.withUnsafeBufferPointer { unlink($0.baseAddress!) } }
            }
            guard fd >= 0 else {
                throw SidecarError(.loadFailed, "cannot hold the bundle for decompression: \(String(cString: strerror(errno)))")
            }
            self.fd = fd
            try data.withUnsafeBytes { bytes in try writeAll(fd, bytes, path: "the bundle's in-memory copy") }
        }

        /// A new descriptor for gzip's standard input, positioned at the start.
        func descriptorForChild() throws -> Int32 {
            let child = dup(fd)
            guard child >= 0, lseek(fd, 0, SEEK_SET) == 0 else {
                if child >= 0 { _ = closeDescriptor(child) }
                throw SidecarError(.loadFailed, "cannot read the bundle's in-memory copy: \(String(cString: strerror(errno)))")
            }
            return child
        }

        deinit { _ = closeDescriptor(fd) }
    }
}

// MARK: - Writing, never through a symlink

extension BundleArchive {
    struct WriteFailure: Error, CustomStringConvertible {
        var description: String
        init(_ what: String, _ path: [String]) {
            description = "\(what) '\(path.joined(separator: "/"))': \(String(cString: strerror(errno)))"
        }
    }

    /// Creates entries under a root directory, walking to each parent with `openat(O_NOFOLLOW)` from
    /// the root's descriptor, so nothing is ever written through a symlink or outside the root.
    struct StagingWriter {
        let root: Int32

        init(root directory: URL) throws {
            root = open(directory.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard root >= 0 else { throw WriteFailure("cannot open the staging directory", [directory.path]) }
        }

        func close() { _ = closeDescriptor(root) }

        /// Opens the directory `path`, creating what is missing (0755).
        func openDirectory(_ path: ArraySlice<String>) throws -> Int32 {
            var fd = dup(root)
            guard fd >= 0 else { throw WriteFailure("cannot open", []) }
            for (depth, component) in path.enumerated() {
                var next = openat(fd, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if next < 0, errno == ENOENT {
                    if mkdirat(fd, component, 0o755) != 0, errno != EEXIST {
                        let failure = WriteFailure("cannot create directory", Array(path.prefix(depth + 1)))
                        _ = closeDescriptor(fd)
                        throw failure
                    }
                    next = openat(fd, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                    if next >= 0 { _ = fchmod(next, 0o755) }
                }
                if next < 0 {
                    let failure = WriteFailure("cannot open directory", Array(path.prefix(depth + 1)))
                    _ = closeDescriptor(fd)
                    throw failure
                }
                _ = closeDescriptor(fd)
                fd = next
            }
            return fd
        }

        func makeDirectory(_ path: [String]) throws {
            let fd = try openDirectory(path[...])
            _ = fchmod(fd, 0o755)
            _ = closeDescriptor(fd)
        }

        /// A new file (0644, or 0755 when executable), opened for writing.
        func createFile(_ path: [String], executable: Bool) throws -> Int32 {
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            let mode: mode_t = executable ? 0o755 : 0o644
            let fd = openat(parent, path.last!, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
            guard fd >= 0 else { throw WriteFailure("cannot create file", path) }
            _ = fchmod(fd, mode)
            return fd
        }

        func makeSymlink(_ path: [String], target: String) throws {
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            guard symlinkat(target, parent, path.last!) == 0 else { throw WriteFailure("cannot create symlink", path) }
        }

        func makeHardLink(_ path: [String], to target: [String]) throws {
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            let targetParent = try openDirectory(target.dropLast())
            defer { _ = closeDescriptor(targetParent) }
            guard linkat(targetParent, target.last!, parent, path.last!, 0) == 0 else {
                throw WriteFailure("cannot create hard link", path)
            }
        }
    }
}

/// Writes all of `bytes` to `fd`.
private func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
    var offset = 0
    while offset < bytes.count {
        let written = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
        if written < 0 {
            if errno == EINTR { continue }
            throw SidecarError(.loadFailed, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
        offset += written
    }
}

private func closeDescriptor(_ fd: Int32) -> Int32 {
    #if canImport(Glibc)
    Glibc.close(fd)
    #else
    Darwin.close(fd)
    #endif
}
