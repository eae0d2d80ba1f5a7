import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Standard output and error for the CLI.
///
/// `FileHandle.write(_: Data)` traps when the write fails, and once SwiftNIO has set SIGPIPE to be
/// ignored (the admin client brings it in) a reader that closes the pipe early (`sidecar status
/// --json | head -1`) makes every write fail with EPIPE: a page of backtrace from a CLI in a
/// pipeline. Here a closed pipe ends the process the way it ends every Unix tool: by SIGPIPE,
/// quietly (the shell sees 141).
enum StandardStreams {
    static func out(_ text: String) { write(Data(text.utf8), to: STDOUT_FILENO) }
    static func out(_ data: Data) { write(data, to: STDOUT_FILENO) }
    static func err(_ text: String) { write(Data(text.utf8), to: STDERR_FILENO) }
    /// A line on standard output (what `print` would write).
    static func line(_ text: String = "") { out(text + "\n") }

    static func write(_ data: Data, to fd: Int32) {
        data.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) in
            guard let base = bytes.baseAddress else { return }
            var offset = 0
            while offset < bytes.count {
                let written = Foundation.write(fd, base + offset, bytes.count - offset)
                if written >= 0 {
                    offset += written
                    continue
                }
                switch errno {
                case EINTR, EAGAIN: continue
                case EPIPE: closedPipe()
                default: return  // nowhere left to report it
                }
            }
        }
    }

    private static func closedPipe() -> Never {
        signal(SIGPIPE, SIG_DFL)
        raise(SIGPIPE)
        exit(141)  // if SIGPIPE is blocked
    }
}
