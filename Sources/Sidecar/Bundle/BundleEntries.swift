import Foundation

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
