import Foundation
import Logging
import Metrics
import ServiceLifecycle

/// What a node knows about its repository, for `/status`, `sidecar sync` and readiness.
public struct RepositoryStatus: Sendable, Codable, Equatable {
    public var source: String
    /// The manifest's revision last read (nil: none read yet).
    public var revision: Int?
    /// When the last sync ended (ISO 8601).
    public var lastSync: String?
    /// The last sync's failure to reach or read the repository (nil once it succeeds again).
    public var lastError: String?
    /// The node has loaded what the manifest asked for (once true, it stays true: a later failure
    /// leaves the running versions serving).
    public var caughtUp = false
    public var syncs = 0
    public var bytesFetched = 0
    public var models: [String: ModelSync] = [:]

    public struct ModelSync: Sendable, Codable, Equatable {
        /// The versions the manifest asks for, with their labels and weights.
        public var desired: [TrafficSplit.Share] = []
        /// The versions serving now, with their weights.
        public var serving: [TrafficSplit.Share] = []
        /// Why a desired version is not serving (fetch, check, environment or load failure).
        public var error: String?
    }

    enum CodingKeys: String, CodingKey {
        case source, revision, lastSync = "last_sync", lastError = "last_error", caughtUp = "caught_up", syncs
        case bytesFetched = "bytes_fetched", models
    }

    static func now() -> String { ISO8601DateFormatter().string(from: Date()) }
}


/// Makes this node serve what the repository's manifest asks for, and keeps it so: one pass at a
/// time, at start, every `pollInterval`, and when asked (``syncNow()``, the admin API's
/// `POST /admin/v1/repository/sync`). A pass:
///
/// 1. reads the manifest if it changed (a stat or a conditional GET);
/// 2. for each model, loads each desired version it lacks — bundle from the node's ``BundleStore``
///    or fetched and checked, environment built or reused — beside the versions serving;
/// 3. only once they are ready, switches the name's traffic to them (``ModelHost/route(_:_:)``),
///    then drains and unloads the versions no longer asked for: no request fails in a rollout;
/// 4. unloads models the manifest dropped, and removes old bundles past the keep count.
///
/// A version that fails to fetch, check, build or load leaves what serves serving; the failure is
/// in the status, the log and `sidecar_repository_failures_total`, and the next pass tries again.
public final class RepositorySync: Service, Sendable {
    public let source: any RepositorySource
    public let host: ModelHost
    public let store: BundleStore
    public let pollInterval: Duration
    /// Bundles kept on disk per model beyond those loaded: the most recent of its history.
    public let keep: Int
    /// How long an old version keeps its batcher open after traffic left it, for requests that
    /// resolved it just before the switch.
    public let drainDelay: Duration
    let logger: Logger

    private struct State {
        var status: RepositoryStatus
        var tag: String?
        var manifest: RepositoryManifest?
        var manifestData: Data?
        /// The last pass left something undone: the next one runs even if the manifest is unchanged.
        var retry = true
        var waiting: [CheckedContinuation<RepositoryStatus, Never>] = []
        /// The bundle each loaded version came from.
        var bundles: [String: [String: String]] = [:]
        /// Versions that failed to fetch, check, build or load (by `name@version`): not tried again
        /// before `retryAt`, so a bad bundle is not downloaded on every poll.
        var failed: [String: (failures: Int, retryAt: ContinuousClock.Instant, reason: String)] = [:]
    }

    private let state: LockedBox<State>
    private let triggers: AsyncStream<Void>
    private let trigger: AsyncStream<Void>.Continuation

    public init(
        source: any RepositorySource, host: ModelHost, store: BundleStore, pollInterval: Duration = .seconds(10), keep: Int = 3,
        drainDelay: Duration = .seconds(2), logger: Logger
    ) {
        self.source = source
        self.host = host
        self.store = store
        self.pollInterval = pollInterval
        self.keep = max(0, keep)
        self.drainDelay = drainDelay
        var logger = logger
        logger[metadataKey: "repository"] = "\(source.description)"
        self.logger = logger
        self.state = LockedBox(State(status: RepositoryStatus(source: source.description)))
        (triggers, trigger) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    public var status: RepositoryStatus { state.withLock { $0.status } }

    /// True once the node serves what the manifest asks for (``RepositoryStatus/caughtUp``).
    public var isCaughtUp: Bool { state.withLock { $0.status.caughtUp } }

    /// The manifest as last read, byte for byte (what this node serves at `/repository/manifest.json`).
    public var manifestData: Data? { state.withLock { $0.manifestData } }

    /// Runs a pass now (after the one under way, if any), retrying failed versions at once, and
    /// returns the status after it.
    public func syncNow() async -> RepositoryStatus {
        await withCheckedContinuation { continuation in
            state.withLock { state in
                state.waiting.append(continuation)
                // Asked by an operator: try everything again now, failed versions included.
                state.retry = true
                state.failed.removeAll()
            }
            trigger.yield()
        }
    }

    public func run() async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                // Ends the loop on a graceful shutdown (in a ServiceGroup) or cancellation.
                _ = try? await gracefulShutdown()
                self.trigger.finish()
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: self.pollInterval)
                    self.trigger.yield()
                }
            }
            trigger.yield()
            for await _ in triggers {
                let waiters = state.withLock { state in
                    defer { state.waiting.removeAll() }
                    return state.waiting
                }
                // A graceful shutdown does not wait for a download or a poll under way.
                await cancelWhenGracefulShutdown { await self.pass() }
                let status = self.status
                for waiter in waiters { waiter.resume(returning: status) }
            }
            group.cancelAll()
        }
        let status = self.status
        for waiter in state.withLock({ state in defer { state.waiting.removeAll() }; return state.waiting }) {
            waiter.resume(returning: status)
        }
    }

    // MARK: One pass

    func pass() async {
        let (tag, retry, previous) = state.withLock { ($0.tag, $0.retry, $0.manifest) }
        let manifest: RepositoryManifest
        do {
            switch try await source.manifest(ifChangedFrom: previous == nil ? nil : tag) {
            case .unchanged:
                // Unchanged and nothing left undone: nothing to do, unless the host drifted from it
                // (an operator unloaded a repository model through the admin API).
                guard retry || previous.map(drifted) == true, let previous else {
                    state.withLock { $0.status.lastSync = RepositoryStatus.now(); $0.status.lastError = nil }
                    return
                }
                manifest = previous
            case .changed(let data, let newTag):
                manifest = try RepositoryManifest.decode(data)
                state.withLock { state in
                    state.tag = newTag
                    state.manifestData = data
                    if state.manifest != manifest { state.retry = true }
                    state.manifest = manifest
                    state.status.revision = manifest.revision
                }
                if previous?.revision != manifest.revision {
                    logger.info("manifest revision \(manifest.revision): \(manifest.models.count) model(s)")
                }
            }
        } catch {
            let message = "the repository \(source.description) cannot be read: \((error as? SidecarError)?.message ?? "\(error)"); serving what is loaded"
            let changed = state.withLock { state -> Bool in
                defer { state.status.lastError = message; state.status.lastSync = RepositoryStatus.now(); state.status.syncs += 1 }
                return state.status.lastError != message
            }
            if changed { logger.error("\(message)") }
            Counter(label: "sidecar_repository_syncs_total", dimensions: [("result", "unreachable")]).increment()
            return
        }
        state.withLock { $0.status.lastError = nil }
        let complete = await apply(manifest)
        state.withLock { state in
            state.retry = !complete
            state.status.syncs += 1
            state.status.lastSync = RepositoryStatus.now()
            if complete { state.status.caughtUp = true }
        }
        Counter(label: "sidecar_repository_syncs_total", dimensions: [("result", complete ? "complete" : "incomplete")]).increment()
        Gauge(label: "sidecar_repository_revision").record(Double(manifest.revision))
    }

    /// The host serves something other than what `manifest` asks for.
    private func drifted(from manifest: RepositoryManifest) -> Bool {
        manifest.models.contains { name, entry in
            let desired = entry.versions.map { TrafficSplit.Share(version: $0.version, weight: $0.weight, label: $0.label) }
            return host.versions(of: name)?.split.shares != desired
        }
    }

    /// Brings the host to `manifest`; true when every model serves exactly what it asks for.
    private func apply(_ manifest: RepositoryManifest) async -> Bool {
        var complete = true
        var retired: [(String, String)] = []
        // Models at once: one model's cold environment build does not hold up the others.
        await withTaskGroup(of: (Bool, [(String, String)]).self) { group in
            for (name, entry) in manifest.models {
                group.addTask { await self.apply(entry, to: name) }
            }
            for await (done, old) in group {
                complete = complete && done
                retired += old
            }
        }
        // Models the manifest no longer has (only those this sync loaded: a model an operator
        // loaded by hand is theirs).
        let dropped = state.withLock { state in state.status.models.keys.filter { manifest.models[$0] == nil } }
        if !retired.isEmpty || !dropped.isEmpty {
            // Requests that resolved an old version just before the switch still reach it.
            try? await Task.sleep(for: drainDelay)
        }
        for (name, version) in retired {
            do {
                try await host.unload(name, version: version)
                _ = state.withLock { $0.bundles[name]?.removeValue(forKey: version) }
                logger.info("version \(version) of '\(name)' drained and unloaded")
            } catch {
                logger.warning("could not unload version \(version) of '\(name)': \(error)")
            }
        }
        for name in dropped {
            try? await host.unload(name)
            state.withLock { state in
                state.status.models[name] = nil
                state.bundles[name] = nil
            }
            logger.info("model '\(name)' left the manifest: unloaded")
        }
        collectGarbage(manifest)
        return complete
    }

    /// One model: load what it lacks, switch once ready, return the versions to drain.
    private func apply(_ entry: RepositoryManifest.Entry, to name: String) async -> (complete: Bool, retired: [(String, String)]) {
        let desired = entry.versions.map { TrafficSplit.Share(version: $0.version, weight: $0.weight, label: $0.label) }
        var failures: [String] = []
        for version in entry.versions {
            let loadedBundle = state.withLock { $0.bundles[name]?[version.version] }
            if host.versions(of: name)?.loaded.contains(version.version) == true {
                if let loadedBundle, loadedBundle != version.bundle {
                    failures.append("version \(version.version) is loaded from bundle \(loadedBundle.prefix(12))… but the manifest names \(version.bundle.prefix(12))…; versions are immutable, publish a new one")
                }
                continue
            }
            let key = ModelHost.key(name, version.version)
            if let failed = state.withLock({ $0.failed[key] }), ContinuousClock.now < failed.retryAt {
                failures.append(failed.reason)
                continue
            }
            do {
                let directory = try await store.directory(for: version.bundle, files: version.files, from: source, logger: logger) { bytes in
                    self.state.withLock { $0.status.bytesFetched += bytes }
                    Counter(label: "sidecar_repository_fetched_bytes_total").increment(by: bytes)
                }
                logger.info("loading version \(version.version) of '\(name)' (bundle \(version.bundle.prefix(12))…)")
                try await host.load(directory.path, name: name, version: version.version, workers: entry.workers)
                state.withLock { state in
                    state.bundles[name, default: [:]][version.version] = version.bundle
                    state.failed[key] = nil
                }
            } catch {
                let reason = "version \(version.version) (bundle \(version.bundle.prefix(12))…): \((error as? SidecarError)?.message ?? "\(error)")"
                failures.append(reason)
                state.withLock { state in
                    // Tried again after the poll interval, doubling per failure up to 5 minutes.
                    let count = (state.failed[key]?.failures ?? 0) + 1
                    let wait = min(Duration.seconds(300), pollInterval * (1 << min(count - 1, 10)))
                    state.failed[key] = (count, ContinuousClock.now + wait, reason)
                }
                Counter(label: "sidecar_repository_failures_total", dimensions: [("model", name)]).increment()
            }
        }
        let loaded = Set(host.versions(of: name)?.loaded ?? [])
        let ready = desired.filter { loaded.contains($0.version) }
        let current = host.versions(of: name)?.split.shares ?? []
        // Switch to the desired split once all of it is ready. With a failure: if the version with
        // the largest share is ready, serve the ready ones (a failed canary drops out); if not, what
        // serves keeps serving (a failed new stable leaves the old one in place).
        let primary = TrafficSplit(desired).primary
        let split: [TrafficSplit.Share]
        if ready.count == desired.count || current.isEmpty || ready.contains(where: { $0.version == primary }) {
            split = ready
        } else {
            split = current
        }
        if !split.isEmpty, split != current {
            do {
                try host.route(name, TrafficSplit(split))
                logger.info("'\(name)' now serves \(split.map { "version \($0.version) (\($0.label ?? "-"), weight \($0.weight))" }.joined(separator: ", "))")
            } catch {
                failures.append("switching traffic: \(error)")
            }
        }
        let serving = host.versions(of: name)?.split.shares ?? []
        let failure = failures.isEmpty ? nil : failures.joined(separator: "; ")
        let previousError = state.withLock { state -> String? in
            defer { state.status.models[name] = .init(desired: desired, serving: serving, error: failure) }
            return state.status.models[name]?.error
        }
        if let failure, failure != previousError {
            logger.error("model '\(name)': \(failure); \(serving.isEmpty ? "nothing serves it" : "version(s) \(serving.map(\.version).joined(separator: ", ")) keep serving")")
        }
        let retired = loaded.subtracting(serving.map(\.version)).sorted().map { (name, $0) }
        return (failures.isEmpty && serving == desired, retired)
    }

    private func collectGarbage(_ manifest: RepositoryManifest) {
        var keepSet = Set<String>()
        for (name, entry) in manifest.models {
            keepSet.formUnion(entry.versions.map(\.bundle))
            keepSet.formUnion(entry.history.suffix(keep).map(\.bundle))
            keepSet.formUnion(state.withLock { Array(($0.bundles[name] ?? [:]).values) })
        }
        keepSet.formUnion(state.withLock { $0.bundles.values.flatMap(\.values) })
        store.collect(keeping: keepSet, logger: logger)
    }
}
