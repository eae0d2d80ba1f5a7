import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

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

        /// The last component: the validator never passes an empty path, but the check is one line.
        private func leaf(_ path: [String]) throws -> String {
            guard let name = path.last else { throw WriteFailure("empty entry path", path) }
            return name
        }

        func makeDirectory(_ path: [String]) throws {
            let fd = try openDirectory(path[...])
            _ = fchmod(fd, 0o755)
            _ = closeDescriptor(fd)
        }

        /// A new file (0644, or 0755 when executable), opened for writing.
        func createFile(_ path: [String], executable: Bool) throws -> Int32 {
            let name = try leaf(path)
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            let mode: mode_t = executable ? 0o755 : 0o644
            let fd = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
            guard fd >= 0 else { throw WriteFailure("cannot create file", path) }
            _ = fchmod(fd, mode)
            return fd
        }

        func makeSymlink(_ path: [String], target: String) throws {
            let name = try leaf(path)
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            guard symlinkat(target, parent, name) == 0 else { throw WriteFailure("cannot create symlink", path) }
        }

        func makeHardLink(_ path: [String], to target: [String]) throws {
            let (name, targetName) = (try leaf(path), try leaf(target))
            let parent = try openDirectory(path.dropLast())
            defer { _ = closeDescriptor(parent) }
            let targetParent = try openDirectory(target.dropLast())
            defer { _ = closeDescriptor(targetParent) }
            guard linkat(targetParent, targetName, parent, name, 0) == 0 else {
                throw WriteFailure("cannot create hard link", path)
            }
        }
    }
}

/// Writes all of `bytes` to `fd`.
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
    var offset = 0
    while offset < bytes.count {
        guard let base = bytes.baseAddress else { return }
        let written = write(fd, base + offset, bytes.count - offset)
        if written < 0 {
            if errno == EINTR { continue }
            throw SidecarError(.loadFailed, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
        offset += written
    }
}

func closeDescriptor(_ fd: Int32) -> Int32 {
    #if canImport(Glibc)
    Glibc.close(fd)
    #else
    Darwin.close(fd)
    #endif
}
