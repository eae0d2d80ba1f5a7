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

    /// Runs pass 1 of `unpack` — the tar reader and every entry check — over a decompressed tar
    /// stream already in memory, fed in pieces of `chunkSize` bytes; returns the number of entries
    /// accepted, or throws the refusal `unpack` would. For tests and the fuzzer, which need the
    /// checks without gzip.
    public static func check(tar: [UInt8], limits: Limits = Limits(), chunkSize: Int = 4096) async throws -> Int {
        var offset = 0
        let step = max(1, chunkSize)
        let source = ByteSource(limit: limits.maxUnpackedBytes) {
            guard offset < tar.count else { return nil }
            let end = offset + min(step, tar.count - offset)
            defer { offset = end }
            return Array(tar[offset..<end])
        }
        var reader = TarReader(source: source)
        do {
            var validator = Validator(limits: limits)
            while let raw = try await reader.next() { _ = try validator.add(raw) }
            try validator.finish()
            try await reader.drain()
            return validator.entries.count
        } catch let refusal as Refusal {
            throw refusal.unpackError
        }
    }

    /// The lowercase hex SHA-256 of `data`, as `unpack` expects it.
    public static func sha256Hex(of data: Data) -> String {
        hex(SHA256.hash(data: data))
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
