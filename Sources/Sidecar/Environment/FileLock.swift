import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An exclusive `flock` on a file, taken without blocking a thread: it polls, so that a second
/// server waiting for another's environment build does not hold a cooperative thread hostage.
final class FileLock {
    private var fd: Int32

    static func acquire(_ url: URL, logger: Logger) async throws -> FileLock {
        let fd = open(url.path, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw SidecarError(.environmentFailed, "cannot open lock file \(url.path): \(String(cString: strerror(errno)))")
        }
        var announced = false
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR else {
                close(fd)
                throw SidecarError(.environmentFailed, "cannot lock \(url.path): \(String(cString: strerror(errno)))")
            }
            if !announced {
                logger.info("waiting for another process building the same environment (\(url.path))")
                announced = true
            }
            do {
                try await Task.sleep(for: .milliseconds(100))
            } catch {
                close(fd)
                throw error
            }
        }
        return FileLock(fd: fd)
    }

    private init(fd: Int32) { self.fd = fd }

    func release() {
        guard fd >= 0 else { return }
        flock(fd, LOCK_UN)
        close(fd)
        fd = -1
    }

    deinit { release() }
}
