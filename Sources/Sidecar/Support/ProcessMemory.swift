import Foundation

/// What /proc says about a process's memory (the supervisor's `recycle.max_rss_mb` check and the
/// status page's RSS).
enum ProcessMemory {
    /// The process's resident memory from /proc (nil where there is none).
    static func residentBytes(of pid: pid_t) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return nil }
        let kilobytes = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { Int($0) }
        return kilobytes.flatMap { Checked.multiply($0, 1024) }
    }
}
