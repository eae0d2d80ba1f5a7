import Foundation
import Subprocess
import Testing
import Sidecar

#if canImport(System)
import System
#else
import SystemPackage
#endif

/// Uploaded model bundles: `.tar.gz` files checked completely before anything is written.
@Suite struct BundleArchiveTests {
    /// A fresh temporary area: `staging` (not created) lies two levels inside `root`, so that
    /// anything written outside staging (`../x`, `../../x`) shows up under `root`.
    struct Area {
        let root: URL
        var staging: URL { root.appendingPathComponent("uploads/staging") }

        init() throws {
            root = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-bundle-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: root.appendingPathComponent("uploads"), withIntermediateDirectories: true)
        }

        /// Everything under `root`, relative, sorted.
        func contents() -> [String] {
            (FileManager.default.subpaths(atPath: root.path) ?? []).sorted()
        }

        func remove() { try? FileManager.default.removeItem(at: root) }
    }

    /// Runs Python's tarfile: `body` calls `add(name, data=b"", type=REGTYPE, linkname="", mode=0o644)`
    /// on a tar written with `format`; returns the `.tar.gz` bytes.
    static func pythonTar(_ body: String, format: String = "GNU_FORMAT", level: Int = 6) async throws -> Data {
        let script = """
            import io, sys, tarfile
            buf = io.BytesIO()
            t = tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.\(format), compresslevel=\(level))
            def add(name, data=b"", type=tarfile.REGTYPE, linkname="", mode=0o644):
                info = tarfile.TarInfo(name)
                info.type = type
                info.linkname = linkname
                info.mode = mode
                regular = type in (tarfile.REGTYPE, tarfile.AREGTYPE)
                info.size = len(data) if regular else 0
                t.addfile(info, io.BytesIO(data) if regular else None)
            \(body.split(separator: "\n").joined(separator: "\n"))
            t.close()
            sys.stdout.buffer.write(buf.getvalue())
            """
        let result = try await Subprocess.run(
            .path(FilePath("/usr/bin/python3.11")), arguments: ["-c", script],
            output: .data(limit: 256 << 20), error: .string(limit: 1 << 16))
        guard result.terminationStatus.isSuccess else {
            Issue.record("python failed: \(result.standardError)")
            throw CancellationError()
        }
        return result.standardOutput
    }

    static func unpack(_ data: Data, into staging: URL, limits: BundleArchive.Limits = .init()) async throws -> URL {
        try await BundleArchive.unpack(data, sha256: BundleArchive.sha256Hex(of: data), into: staging, limits: limits)
    }

    static func permissions(_ url: URL) throws -> Int {
        try FileManager.default.attributesOfItem(atPath: url.path)[.posixPermissions] as! Int
    }

    // MARK: Good bundles

    @Test func packedDirectoryRoundTrips() async throws {
        let model = try Fixtures.model([
            "handler.py": "def predict(batch):\n    return batch\n",
            "init.sh": "#!/bin/sh\necho ready\n",
            "nested/deeper/weights.txt": "0.5 0.25\n",
            "__pycache__/handler.cpython-311.pyc": "stale",
            "nested/__pycache__/x.pyc": "stale",
        ])
        defer { try? FileManager.default.removeItem(at: model.deletingLastPathComponent()) }
        try FileManager.default.setAttributes([.posixPermissions: 0o700], ofItemAtPath: model.appendingPathComponent("init.sh").path)
        try FileManager.default.createSymbolicLink(atPath: model.appendingPathComponent("latest").path, withDestinationPath: "nested/deeper/weights.txt")

        let (data, sha) = try await BundleArchive.pack(directory: model)
        #expect(sha == BundleArchive.sha256Hex(of: data))
        #expect(sha.count == 64)

        let area = try Area()
        defer { area.remove() }
        let dir = try await BundleArchive.unpack(data, sha256: sha.uppercased(), into: area.staging)
        #expect(dir.standardizedFileURL.path == area.staging.standardizedFileURL.path)
        #expect(try String(contentsOf: dir.appendingPathComponent("handler.py"), encoding: .utf8) == "def predict(batch):\n    return batch\n")
        #expect(try String(contentsOf: dir.appendingPathComponent("nested/deeper/weights.txt"), encoding: .utf8) == "0.5 0.25\n")
        #expect(try Self.permissions(dir.appendingPathComponent("init.sh")) == 0o755)
        #expect(try Self.permissions(dir.appendingPathComponent("handler.py")) == 0o644)
        #expect(try Self.permissions(dir.appendingPathComponent("nested/deeper")) == 0o755)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: dir.appendingPathComponent("latest").path) == "nested/deeper/weights.txt")
        #expect(try String(contentsOf: dir.appendingPathComponent("latest"), encoding: .utf8) == "0.5 0.25\n")
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("__pycache__").path))
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("nested/__pycache__").path))
        // The unpacked directory is a model directory.
        let bundle = try ModelBundle(directory: dir.path)
        #expect(bundle.initScript != nil)
    }

    @Test func tarOfTheDirectoryItselfYieldsTheInnerDirectory() async throws {
        let model = try Fixtures.model(["handler.py": "def predict(b): return b\n", "sub/x.txt": "x"], name: "mymodel")
        defer { try? FileManager.default.removeItem(at: model.deletingLastPathComponent()) }
        // What `tar czf m.tgz mymodel/` makes.
        let result = try await Subprocess.run(
            .path(FilePath("/bin/tar")), arguments: ["czf", "-", "-C", model.deletingLastPathComponent().path, "mymodel/"],
            output: .data(limit: 1 << 20), error: .string(limit: 1 << 16))
        #expect(result.terminationStatus.isSuccess, "\(result.standardError)")

        let area = try Area()
        defer { area.remove() }
        let dir = try await Self.unpack(result.standardOutput, into: area.staging)
        #expect(dir.standardizedFileURL.path == area.staging.appendingPathComponent("mymodel").standardizedFileURL.path)
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("handler.py").path))
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("sub/x.txt").path))
    }

    @Test(arguments: ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"])
    func longNamesLinksAndModesInEveryTarFormat(format: String) async throws {
        // Over 100 bytes: a GNU 'L' entry, a pax path, or the ustar prefix field.
        let long = String(repeating: "d", count: 60) + "/" + String(repeating: "e", count: 60) + "/" + String(repeating: "f", count: 40) + ".txt"
        // ustar link names cannot be longer than 100 bytes.
        let linked = format == "USTAR_FORMAT" ? "short.txt" : long
        let data = try await Self.pythonTar(
            """
            add("handler.py", b"def predict(b): return b\\n")
            add("run.sh", b"#!/bin/sh\\n", mode=0o4750)
            add("\(long)", b"long")
            add("short.txt", b"long")
            add("weights", type=tarfile.DIRTYPE, mode=0o500)
            add("weights/current", type=tarfile.SYMTYPE, linkname="../\(linked)")
            add("same.txt", type=tarfile.LNKTYPE, linkname="\(linked)")
            """, format: format)
        let area = try Area()
        defer { area.remove() }
        let dir = try await Self.unpack(data, into: area.staging)
        #expect(try String(contentsOf: dir.appendingPathComponent(long), encoding: .utf8) == "long")
        #expect(try String(contentsOf: dir.appendingPathComponent("weights/current"), encoding: .utf8) == "long")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: dir.appendingPathComponent("weights/current").path) == "../\(linked)")
        #expect(try String(contentsOf: dir.appendingPathComponent("same.txt"), encoding: .utf8) == "long")
        #expect(try Self.permissions(dir.appendingPathComponent("run.sh")) == 0o755)  // no setuid: only the x bit counts
        #expect(try Self.permissions(dir.appendingPathComponent("short.txt")) == 0o644)
        #expect(try Self.permissions(dir.appendingPathComponent("weights")) == 0o755)
    }

    // MARK: Malicious and broken bundles

    struct Malicious: Sendable, CustomTestStringConvertible {
        var label: String
        /// Python lines calling add(...); `SENTINEL` is replaced by an absolute path outside staging.
        var tar: String
        var message: String
        var format = "GNU_FORMAT"
        var testDescription: String { label }
    }

    static let malicious: [Malicious] = [
        Malicious(label: "path traversal", tar: #"add("handler.py"); add("../evil", b"x")"#,
                  message: "bundle entry '../evil' escapes the bundle (path contains '..'); nothing was unpacked"),
        Malicious(label: "deep traversal", tar: #"add("../../etc/passwd", b"x")"#,
                  message: "bundle entry '../../etc/passwd' escapes the bundle (path contains '..')"),
        Malicious(label: "traversal inside a path", tar: #"add("a/b/../../../evil", b"x")"#,
                  message: "bundle entry 'a/b/../../../evil' escapes the bundle (path contains '..')"),
        Malicious(label: "absolute path", tar: #"add("handler.py"); add("SENTINEL", b"x")"#,
                  message: "escapes the bundle (absolute path)"),
        Malicious(label: "absolute path in a pax header", tar: #"add("SENTINEL/" + "x" * 120, b"x")"#,
                  message: "escapes the bundle (absolute path)", format: "PAX_FORMAT"),
        Malicious(label: "symlink to /etc", tar: #"add("link", type=tarfile.SYMTYPE, linkname="/etc"); add("link/passwd", b"x")"#,
                  message: "bundle entry 'link' is a symlink to '/etc', outside the bundle"),
        Malicious(label: "symlink climbing out", tar: #"add("sub", type=tarfile.DIRTYPE); add("sub/link", type=tarfile.SYMTYPE, linkname="../../x")"#,
                  message: "bundle entry 'sub/link' is a symlink to '../../x', which resolves outside the bundle"),
        Malicious(label: "symlink out through another symlink",
                  tar: #"add("d", type=tarfile.DIRTYPE); add("d/up", type=tarfile.SYMTYPE, linkname=".."); add("x", type=tarfile.SYMTYPE, linkname="d/up/..")"#,
                  message: "bundle entry 'x' is a symlink to 'd/up/..', which resolves outside the bundle"),
        Malicious(label: "file written through an in-bundle symlink",
                  tar: #"add("sub", type=tarfile.DIRTYPE); add("link", type=tarfile.SYMTYPE, linkname="sub"); add("link/f", b"x")"#,
                  message: "bundle entry 'link/f' lies inside the symlink 'link'"),
        Malicious(label: "symlink loop", tar: #"add("a", type=tarfile.SYMTYPE, linkname="b"); add("b", type=tarfile.SYMTYPE, linkname="a")"#,
                  message: "is a symlink loop"),
        Malicious(label: "hard link to an absolute path", tar: #"add("hl", type=tarfile.LNKTYPE, linkname="/etc/passwd")"#,
                  message: "bundle entry 'hl' is a hard link to '/etc/passwd', outside the bundle (absolute path)"),
        Malicious(label: "hard link climbing out", tar: #"add("hl", type=tarfile.LNKTYPE, linkname="../../etc/passwd")"#,
                  message: "bundle entry 'hl' is a hard link to '../../etc/passwd', outside the bundle (path contains '..')"),
        Malicious(label: "hard link to nothing in the bundle", tar: #"add("hl", type=tarfile.LNKTYPE, linkname="etc/passwd")"#,
                  message: "bundle entry 'hl' is a hard link to 'etc/passwd', which is not a regular file earlier in the bundle"),
        Malicious(label: "character device", tar: #"add("handler.py"); add("dev/null", type=tarfile.CHRTYPE)"#,
                  message: "bundle entry 'dev/null' is a character device; a bundle may hold only regular files, directories and symlinks"),
        Malicious(label: "block device", tar: #"add("sda", type=tarfile.BLKTYPE)"#, message: "bundle entry 'sda' is a block device"),
        Malicious(label: "FIFO", tar: #"add("pipe", type=tarfile.FIFOTYPE)"#, message: "bundle entry 'pipe' is a FIFO"),
        Malicious(label: "unknown entry type", tar: #"add("label", type=b"V")"#,
                  message: "bundle entry 'label' has tar entry type 'V' (volume label), which a bundle may not hold"),
        Malicious(label: "entry replaced by a later one", tar: #"add("handler.py", b"1"); add("handler.py", b"2")"#,
                  message: "bundle entry 'handler.py' appears twice in the bundle"),
        Malicious(label: "file under a file", tar: #"add("a", b"1"); add("a/b", b"2")"#,
                  message: "bundle entry 'a/b' lies inside 'a', which is not a directory"),
        Malicious(label: "empty archive", tar: "pass", message: "bundle holds no files"),
    ]

    @Test(arguments: malicious)
    func maliciousBundleIsRefusedAndNothingIsWritten(_ bad: Malicious) async throws {
        let area = try Area()
        defer { area.remove() }
        let sentinel = "/tmp/sidecar-evil-\(UUID().uuidString.prefix(8))"
        let data = try await Self.pythonTar(bad.tar.replacingOccurrences(of: "; ", with: "\n").replacingOccurrences(of: "SENTINEL", with: sentinel), format: bad.format)
        await Self.expectRefusal(data, area: area, message: bad.message)
        #expect(!FileManager.default.fileExists(atPath: sentinel))
    }

    /// Unpacks `data` with its correct sha256 and expects a refusal naming `message`, with nothing
    /// written: not even the staging directory.
    static func expectRefusal(
        _ data: Data, sha256: String? = nil, area: Area, limits: BundleArchive.Limits = .init(), message: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async {
        do {
            let dir = try await BundleArchive.unpack(
                data, sha256: sha256 ?? BundleArchive.sha256Hex(of: data), into: area.staging, limits: limits)
            Issue.record("unpacked into \(dir.path) instead of refusing", sourceLocation: sourceLocation)
        } catch let error as SidecarError {
            #expect(error.code == .invalidInput, sourceLocation: sourceLocation)
            #expect(error.message.contains(message), "\(error.message)", sourceLocation: sourceLocation)
            #expect(error.message.hasSuffix("; nothing was unpacked"), "\(error.message)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
        #expect(area.contents() == ["uploads"], "written: \(area.contents())", sourceLocation: sourceLocation)
    }

    @Test func wrongOrMalformedSHA256IsRefused() async throws {
        let model = try Fixtures.model(["handler.py": "def predict(b): return b\n"])
        defer { try? FileManager.default.removeItem(at: model.deletingLastPathComponent()) }
        let (data, sha) = try await BundleArchive.pack(directory: model)
        let area = try Area()
        defer { area.remove() }
        let wrong = String(repeating: "0", count: 64)
        await Self.expectRefusal(data, sha256: wrong, area: area, message: "bundle sha256 does not match: expected \(wrong), the upload's is \(sha)")
        await Self.expectRefusal(data, sha256: "abc", area: area, message: "sha256 'abc' is not 64 hexadecimal digits")
        var damaged = data
        damaged[damaged.count / 2] ^= 0xff
        await Self.expectRefusal(damaged, sha256: sha, area: area, message: "sha256 does not match")
    }

    @Test func oversizedUploadIsRefusedBeforeDecompressing() async throws {
        let data = try await Self.pythonTar(#"add("handler.py", b"x" * 4000)"#, level: 0)
        let area = try Area()
        defer { area.remove() }
        await Self.expectRefusal(
            data, area: area, limits: .init(maxCompressedBytes: 1024),
            message: "over the limit of 1 KiB for an upload")
    }

    @Test func gzipBombStopsAtTheUnpackedLimit() async throws {
        // 200 MiB of zeros compresses to about 200 KB.
        let data = try await Self.pythonTar(#"add("handler.py"); add("zeros", bytes(200 << 20))"#, level: 9)
        #expect(data.count < 1 << 20)
        let area = try Area()
        defer { area.remove() }
        let start = ContinuousClock.now
        await Self.expectRefusal(
            data, area: area, limits: .init(maxUnpackedBytes: 1 << 20), message: "bundle decompresses to more than 1 MiB, the limit")
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test func tooManyEntriesAreRefused() async throws {
        let data = try await Self.pythonTar(#"add("a"); add("b"); add("c")"#.replacingOccurrences(of: "; ", with: "\n"))
        let area = try Area()
        defer { area.remove() }
        await Self.expectRefusal(data, area: area, limits: .init(maxEntries: 2), message: "bundle has more than 2 entries, the limit")
    }

    @Test func dataThatIsNotATarGzIsRefused() async throws {
        let area = try Area()
        defer { area.remove() }
        await Self.expectRefusal(Data("this is not gzip at all".utf8), area: area, message: "bundle is not valid gzip data (gzip: stdin: not in gzip format)")
        await Self.expectRefusal(Data(), area: area, message: "bundle is not valid gzip data")

        // Valid gzip of something that is not a tar.
        let text = try await Subprocess.run(
            .path(FilePath("/usr/bin/python3.11")), arguments: ["-c", "import gzip, sys; sys.stdout.buffer.write(gzip.compress(b'hello world\\n' * 100))"],
            output: .data(limit: 1 << 20), error: .discarded)
        await Self.expectRefusal(text.standardOutput, area: area, message: "bundle is not a tar archive")

        // A good bundle cut short: gzip's complaint wins over the truncated tar.
        let good = try await Self.pythonTar(#"add("handler.py", bytes(range(256)) * 400)"#, level: 1)
        await Self.expectRefusal(good.prefix(good.count / 2), area: area, message: "bundle is not valid gzip data")
    }

    @Test func stagingMustBeFreshAndStaysEmptyOnRefusal() async throws {
        let area = try Area()
        defer { area.remove() }
        let data = try await Self.pythonTar(#"add("handler.py", b"x")"#)
        try FileManager.default.createDirectory(at: area.staging, withIntermediateDirectories: true)
        try Data("x".utf8).write(to: area.staging.appendingPathComponent("old"))
        await #expect(throws: SidecarError.self) { _ = try await Self.unpack(data, into: area.staging) }
        try FileManager.default.removeItem(at: area.staging.appendingPathComponent("old"))
        // An existing empty directory is fine.
        let dir = try await Self.unpack(data, into: area.staging)
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("handler.py").path))
    }

    @Test func packRefusesWhatAServerWouldRefuse() async throws {
        let model = try Fixtures.model(["handler.py": "def predict(b): return b\n"])
        defer { try? FileManager.default.removeItem(at: model.deletingLastPathComponent()) }
        try FileManager.default.createSymbolicLink(atPath: model.appendingPathComponent("etc").path, withDestinationPath: "/etc")
        do {
            _ = try await BundleArchive.pack(directory: model)
            Issue.record("packed a directory with a symlink to /etc")
        } catch let error as SidecarError {
            #expect(error.code == .invalidModel)
            #expect(error.message.contains("entry './etc' is a symlink to '/etc', outside the bundle"), "\(error.message)")
        }
        await #expect(throws: SidecarError.self) { _ = try await BundleArchive.pack(directory: URL(fileURLWithPath: "/nonexistent/model")) }
    }
}
