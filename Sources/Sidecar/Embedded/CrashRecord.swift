import Foundation

/// What an embedded model is doing, kept where a crash cannot erase it: a small memory-mapped file
/// per model (`<cache>/embedded/<model>.state`), written before and after every batch.
///
/// A handler that segfaults takes the whole server down, and with it any log line not yet flushed.
/// The mapping's pages belong to the kernel's page cache, so a store into it survives the process:
/// the next server start reads "running batch N of K items since T, pid P" and knows which model
/// killed it. The file is `flock`ed while a server uses it: a lock that is free while the record
/// says "running" means its owner died mid-batch (or mid-load). A store costs nanoseconds, so every
/// batch can leave its mark.
final class CrashRecord: @unchecked Sendable {
    /// A record a dead server left: the model was loading or running a batch when it died.
    struct Crash: Sendable, Equatable {
        var pid: Int32
        /// Nil when it died while loading the handler.
        var batch: UInt64?
        var items: Int
        var since: Date
        /// The tail of `faulthandler`'s report (the Python stacks), when there is one.
        var faultLog: String?

        var summary: String {
            let when = ISO8601DateFormatter().string(from: since)
            let what = batch.map { "while running batch \($0) (\(items) item\(items == 1 ? "" : "s"))" } ?? "while loading the handler"
            return "the embedded executor took the server down (pid \(pid)) \(what), started \(when)"
        }
    }

    private enum Phase: UInt64 { case idle = 0, loading = 1, running = 2 }
    private static let magic: UInt64 = 0x5344_4352_4352_4231  // "SDCRCRB1"
    private static let size = 64

    let url: URL
    private let descriptor: Int32
    private let base: UnsafeMutableRawPointer

    private init(url: URL, descriptor: Int32, base: UnsafeMutableRawPointer) {
        self.url = url
        self.descriptor = descriptor
        self.base = base
    }

    deinit {
        munmap(base, Self.size)
        close(descriptor)  // releases the lock
    }

    /// The directory of the records and fault logs.
    static func directory(cache: URL) -> URL { cache.appendingPathComponent("embedded") }

    /// Where the interpreter's `faulthandler` writes, for the server process `pid`.
    static func faultLog(in directory: URL, pid: Int32) -> URL { directory.appendingPathComponent("faults-\(pid).log") }

    /// Opens (and locks) the record of `model`. Returns the crash a dead server left in it, if any,
    /// and the record itself, or nil when another running server holds it (two servers sharing one
    /// cache directory and model name): then this one keeps no record.
    static func open(directory: URL, model: String) throws -> (record: CrashRecord?, crash: Crash?) {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let url = directory.appendingPathComponent("\(model).state")
        let fd = Glibc.open(url.path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SidecarError(.environmentFailed, "cannot open \(url.path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            Glibc.close(fd)
            return (nil, nil)
        }
        var words = [UInt64](repeating: 0, count: 6)
        let read = words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        var crash: Crash?
        if read == 48, words[0] == magic, let phase = Phase(rawValue: words[1]), phase != .idle {
            let pid = Int32(truncatingIfNeeded: words[2])
            let log = faultLog(in: directory, pid: pid)
            let tail = (try? String(contentsOf: log, encoding: .utf8)).map { $0.split(separator: "\n").suffix(40).joined(separator: "\n") }
            crash = Crash(
                pid: pid, batch: phase == .running ? words[3] : nil, items: Int(truncatingIfNeeded: words[4]),
                since: Date(timeIntervalSince1970: Double(words[5]) / 1e9), faultLog: tail?.isEmpty == false ? tail : nil)
        }
        guard ftruncate(fd, off_t(size)) == 0, let base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED else {
            Glibc.close(fd)
            throw SidecarError(.environmentFailed, "cannot map \(url.path): \(String(cString: strerror(errno)))")
        }
        return (CrashRecord(url: url, descriptor: fd, base: base), crash)
    }

    /// Forgets a crash (an operator reloaded the model embedded, or it runs without one now).
    func clear() {
        store(.idle, batch: 0, items: 0)
    }

    func loading() { store(.loading, batch: 0, items: 0) }

    func running(batch: UInt64, items: Int) { store(.running, batch: batch, items: items) }

    func idle() { base.storeBytes(of: Phase.idle.rawValue, toByteOffset: 8, as: UInt64.self) }

    private func store(_ phase: Phase, batch: UInt64, items: Int) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        base.storeBytes(of: Self.magic, toByteOffset: 0, as: UInt64.self)
        base.storeBytes(of: UInt64(UInt32(bitPattern: getpid())), toByteOffset: 16, as: UInt64.self)
        base.storeBytes(of: batch, toByteOffset: 24, as: UInt64.self)
        base.storeBytes(of: UInt64(items), toByteOffset: 32, as: UInt64.self)
        base.storeBytes(of: UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec), toByteOffset: 40, as: UInt64.self)
        // The phase last: a record is never "running" with the previous batch's numbers.
        base.storeBytes(of: phase.rawValue, toByteOffset: 8, as: UInt64.self)
    }
}
