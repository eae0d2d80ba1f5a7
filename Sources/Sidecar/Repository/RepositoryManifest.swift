import Foundation

/// The desired state of every node: which models to serve, from which bundle (by SHA-256), at which
/// version, with how many workers, and how a name's traffic is split between labelled versions
/// (`stable`, `canary`, ...). Nodes only read it; `sidecar publish` and `sidecar rollback` write it
/// (``RepositoryPublisher``). JSON, so any tool (and a person) can read and diff it:
///
/// ```json
/// {"format": 1, "revision": 4, "models": {"iris": {"workers": 2,
///   "versions": [{"version": "3", "bundle": "9f2c…", "label": "stable", "weight": 90},
///                {"version": "4", "bundle": "51ab…", "label": "canary", "weight": 10}],
///   "history": [{"version": "1", "bundle": "…"}, {"version": "2", "bundle": "…"}, …]}}}
/// ```
public struct RepositoryManifest: Codable, Sendable, Equatable {
    public static let currentFormat = 1
    /// How many past versions a model's history keeps (what `rollback` can go back to).
    public static let historyLimit = 50

    public var format: Int = RepositoryManifest.currentFormat
    /// Counts every change, so a person (and a log line) can tell manifests apart.
    public var revision: Int = 0
    public var models: [String: Entry] = [:]

    public struct Entry: Codable, Sendable, Equatable {
        /// Worker processes per node (nil: the bundle's `sidecar.yaml`).
        public var workers: Int?
        /// The versions that serve, each under its own label; the weights split the traffic.
        public var versions: [Version] = []
        /// Every version published, oldest first.
        public var history: [Published] = []

        public init(workers: Int? = nil, versions: [Version] = [], history: [Published] = []) {
            self.workers = workers
            self.versions = versions
            self.history = history
        }
    }

    public struct Version: Codable, Sendable, Equatable {
        public var version: String
        /// Hex SHA-256 of the bundle (`bundles/<sha256>.tar.gz`).
        public var bundle: String
        public var label: String
        public var weight: Int
        /// Hex SHA-256 of the bundle's file index (`bundles/<bundle>.files.json`), when it has one:
        /// nodes then fetch only the files they lack (``BundleIndex``).
        public var files: String?

        public init(version: String, bundle: String, label: String, weight: Int, files: String? = nil) {
            self.version = version
            self.bundle = bundle
            self.label = label
            self.weight = weight
            self.files = files
        }
    }

    public struct Published: Codable, Sendable, Equatable {
        public var version: String
        public var bundle: String
        public var files: String?
    }

    public init() {}

    /// Reads and checks a manifest: a refusal names what is wrong, so that a bad manifest is
    /// reported (and the node keeps serving what it has) rather than half applied.
    public static func decode(_ data: Data) throws -> RepositoryManifest {
        let manifest: RepositoryManifest
        do {
            manifest = try JSONDecoder().decode(RepositoryManifest.self, from: data)
        } catch {
            throw SidecarError(.invalidConfiguration, "the repository's manifest.json is not a valid manifest: \(error)", cause: error)
        }
        try manifest.check()
        return manifest
    }

    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return try encoder.encode(self)
    }

    public func check() throws {
        guard format == Self.currentFormat else {
            throw SidecarError(.invalidConfiguration, "manifest.json has format \(format); this Sidecar reads format \(Self.currentFormat) (upgrade it)")
        }
        for (name, entry) in models {
            func fail(_ what: String) -> SidecarError {
                SidecarError(.invalidConfiguration, "manifest.json, model '\(name)': \(what)")
            }
            guard ModelConfiguration.isValidName(name) else { throw fail("not a valid model name (letters, digits, '-', '_', '.')") }
            if let workers = entry.workers, !ModelConfiguration.workerRange.contains(workers) {
                throw fail("workers must be from \(ModelConfiguration.workerRange.lowerBound) to \(ModelConfiguration.workerRange.upperBound), got \(workers)")
            }
            var labels = Set<String>()
            var versions = Set<String>()
            for version in entry.versions {
                guard ModelConfiguration.isValidName(version.version) else { throw fail("version '\(version.version.prefix(100))' is not valid (letters, digits, '-', '_', '.')") }
                guard Self.isSHA256(version.bundle) else { throw fail("version \(version.version): bundle must be a hex SHA-256, got '\(version.bundle.prefix(100))'") }
                if let files = version.files, !Self.isSHA256(files) { throw fail("version \(version.version): files must be a hex SHA-256, got '\(files.prefix(100))'") }
                guard version.weight > 0 else { throw fail("version \(version.version): weight must be positive, got \(version.weight)") }
                guard labels.insert(version.label).inserted else { throw fail("label '\(version.label)' appears twice") }
                guard versions.insert(version.version).inserted else { throw fail("version \(version.version) appears under two labels") }
            }
        }
    }

    public static func isSHA256(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    // MARK: Changes (what publish and rollback do)

    /// Publishes `bundle` as `version` (default: one past the highest numeric version published)
    /// of `name` under `label` with `weight`; the label's previous version stops serving. A
    /// `weight` of 0 removes the label instead. Returns the version that now holds the label.
    @discardableResult
    public mutating func publish(
        name: String, bundle: String?, version: String? = nil, label: String = "stable", weight: Int = 100, workers: Int? = nil
    ) throws -> String? {
        guard ModelConfiguration.isValidName(name) else {
            throw SidecarError(.invalidInput, "'\(name)' is not a valid model name (letters, digits, '-', '_', '.')")
        }
        guard weight >= 0 else { throw SidecarError(.invalidInput, "--weight must be 0 or more, got \(weight)") }
        var entry = models[name] ?? Entry()
        if let workers { entry.workers = workers }
        defer { revision += 1 }
        if weight == 0 {
            guard entry.versions.contains(where: { $0.label == label }) else {
                throw SidecarError(.invalidInput, "model '\(name)' has no version labelled '\(label)' to remove")
            }
            entry.versions.removeAll { $0.label == label }
            models[name] = entry.versions.isEmpty ? nil : entry
            if entry.versions.isEmpty { models[name] = nil }
            return nil
        }
        let chosen: Published
        if let bundle {
            let number = version ?? String((entry.history.compactMap { Int($0.version) }.max() ?? 0) + 1)
            guard ModelConfiguration.isValidName(number) else { throw SidecarError(.invalidInput, "'\(number)' is not a valid version") }
            if let known = entry.history.first(where: { $0.version == number }), known.bundle != bundle {
                throw SidecarError(.conflict, "model '\(name)' already has a version \(number) with another bundle; versions are immutable, publish a new one")
            }
            chosen = Published(version: number, bundle: bundle)
            if !entry.history.contains(where: { $0.version == number }) { entry.history.append(chosen) }
            if entry.history.count > Self.historyLimit { entry.history.removeFirst(entry.history.count - Self.historyLimit) }
        } else {
            // No bundle: point the label at a version published before.
            guard let version, let known = entry.history.last(where: { $0.version == version }) else {
                throw SidecarError(.invalidInput, "model '\(name)' has no published version '\(version ?? "?")'; published: \(entry.history.map(\.version).joined(separator: ", "))")
            }
            chosen = known
        }
        // A version serves under one label: moving it (canary → stable) takes it off the other.
        entry.versions.removeAll { $0.label == label || $0.version == chosen.version }
        let files = entry.history.last { $0.version == chosen.version }?.files
        entry.versions.append(Version(version: chosen.version, bundle: chosen.bundle, label: label, weight: weight, files: files))
        entry.versions.sort { ($0.label == "stable" ? 0 : 1, $0.label) < ($1.label == "stable" ? 0 : 1, $1.label) }
        models[name] = entry
        return chosen.version
    }

    /// Points `label` of `name` back at the version published before the one it has (or at `to`).
    /// Returns the version it now has.
    public mutating func rollback(name: String, label: String = "stable", to target: String? = nil) throws -> String {
        guard let entry = models[name] else {
            throw SidecarError(.notFound, "the repository has no model '\(name)'; it has: \(models.keys.sorted().joined(separator: ", "))")
        }
        guard let current = entry.versions.first(where: { $0.label == label }) else {
            throw SidecarError(.invalidInput, "model '\(name)' has no version labelled '\(label)'")
        }
        let version: String
        if let target {
            version = target
        } else {
            guard let index = entry.history.lastIndex(where: { $0.version == current.version }), index > 0 else {
                throw SidecarError(.invalidInput, "model '\(name)' has no version published before \(current.version) to roll back to")
            }
            version = entry.history[index - 1].version
        }
        return try publish(name: name, bundle: nil, version: version, label: label, weight: current.weight) ?? version
    }
}
