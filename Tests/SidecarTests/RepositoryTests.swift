import Foundation
import Testing
@testable import Sidecar

/// The model repository's pieces: the manifest's changes (pure), the traffic split, the directory
/// source and bundle store on real files, and one sync of a real host (real Python workers) through
/// a rollout and a corrupted bundle. The multi-node behaviour is in Tests/e2e/test_repository.py.
@Suite struct RepositoryTests {
    let shaA = String(repeating: "a", count: 64)
    let shaB = String(repeating: "b", count: 64)
    let shaC = String(repeating: "c", count: 64)

    // MARK: The manifest

    @Test func publishingNumbersVersionsAndMovesTheLabel() throws {
        var manifest = RepositoryManifest()
        #expect(try manifest.publish(name: "iris", bundle: shaA) == "1")
        #expect(try manifest.publish(name: "iris", bundle: shaB) == "2")
        let entry = try #require(manifest.models["iris"])
        #expect(entry.versions == [.init(version: "2", bundle: shaB, label: "stable", weight: 100)])
        #expect(entry.history.map(\.version) == ["1", "2"])
        #expect(manifest.revision == 2)
    }

    @Test func aCanaryServesBesideStableAndWeightZeroRemovesIt() throws {
        var manifest = RepositoryManifest()
        try manifest.publish(name: "iris", bundle: shaA)
        try manifest.publish(name: "iris", bundle: shaB, label: "canary", weight: 10)
        #expect(manifest.models["iris"]?.versions.map(\.label) == ["stable", "canary"])
        try manifest.publish(name: "iris", bundle: nil, label: "canary", weight: 0)
        #expect(manifest.models["iris"]?.versions.map(\.version) == ["1"])
        // Promoting the canary's version to stable takes it off the canary label.
        try manifest.publish(name: "iris", bundle: shaC, label: "canary", weight: 10)
        try manifest.publish(name: "iris", bundle: nil, version: "3", label: "stable")
        #expect(manifest.models["iris"]?.versions == [.init(version: "3", bundle: shaC, label: "stable", weight: 100)])
    }

    @Test func versionsAreImmutable() throws {
        var manifest = RepositoryManifest()
        try manifest.publish(name: "iris", bundle: shaA, version: "7")
        #expect(throws: SidecarError.self) { try manifest.publish(name: "iris", bundle: shaB, version: "7") }
        // The same bundle under the same version is a no-op republish.
        #expect(try manifest.publish(name: "iris", bundle: shaA, version: "7") == "7")
    }

    @Test func rollbackGoesToThePreviousVersionOrTheOneNamed() throws {
        var manifest = RepositoryManifest()
        try manifest.publish(name: "iris", bundle: shaA)
        try manifest.publish(name: "iris", bundle: shaB)
        try manifest.publish(name: "iris", bundle: shaC)
        #expect(try manifest.rollback(name: "iris") == "2")
        #expect(try manifest.rollback(name: "iris") == "1")
        #expect(throws: SidecarError.self) { try manifest.rollback(name: "iris") }
        #expect(try manifest.rollback(name: "iris", to: "3") == "3")
        #expect(manifest.models["iris"]?.versions.first?.bundle == shaC)
    }

    @Test func aBadManifestIsRefusedNamingWhatIsWrong() throws {
        let bad = #"{"format": 1, "revision": 1, "models": {"iris": {"versions": [{"version": "1", "bundle": "nothex", "label": "stable", "weight": 100}], "history": []}}}"#
        let error = try #require(throws: SidecarError.self) { try RepositoryManifest.decode(Data(bad.utf8)) }
        #expect(error.message.contains("iris") && error.message.contains("SHA-256"))
        let future = #"{"format": 9, "revision": 1, "models": {}}"#
        #expect(throws: SidecarError.self) { try RepositoryManifest.decode(Data(future.utf8)) }
        #expect(throws: SidecarError.self) { try RepositoryManifest.decode(Data("not json".utf8)) }
    }

    // MARK: The traffic split

    @Test func theSplitFollowsTheWeights() {
        let split = TrafficSplit([.init(version: "1", weight: 80), .init(version: "2", weight: 20)])
        #expect(split.primary == "1")
        var counts: [String: Int] = [:]
        for index in 0..<10_000 { counts[split.pick(key: "request-\(index)")!, default: 0] += 1 }
        let share = Double(counts["2"] ?? 0) / 10_000
        #expect(abs(share - 0.2) < 0.02, "canary share \(share)")
    }

    @Test func aKeyAlwaysReachesTheSameVersion() {
        let split = TrafficSplit([.init(version: "1", weight: 50), .init(version: "2", weight: 50)])
        let first = split.pick(key: "user-42")
        #expect((0..<100).allSatisfy { _ in split.pick(key: "user-42") == first })
        #expect(TrafficSplit([.init(version: "1", weight: 0)]).pick(key: nil) == nil)
    }

    // MARK: Files

    @Test func theDirectorySourceSeesAChangeAndOnlyAChange() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-repo-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let publisher = RepositoryPublisher(root: root)
        let model = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch\n"], name: "echo")
        let (_, sha) = try await publisher.publish(directory: model) { manifest, bundle in
            try manifest.publish(name: "echo", bundle: bundle)
        }
        let source = DirectoryRepository(root: root)
        guard case .changed(let data, let tag) = try await source.manifest(ifChangedFrom: nil) else { Issue.record("no manifest"); return }
        #expect(try RepositoryManifest.decode(data).models["echo"]?.versions.first?.bundle == sha)
        guard case .unchanged = try await source.manifest(ifChangedFrom: tag) else { Issue.record("an unchanged manifest read again"); return }
        _ = try await publisher.publish(directory: nil) { manifest, _ in try manifest.publish(name: "echo", bundle: nil, version: "1", label: "stable", weight: 50) }
        guard case .changed = try await source.manifest(ifChangedFrom: tag) else { Issue.record("a changed manifest not seen"); return }
        // No temporary file is left beside what was renamed into place.
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: root.path).filter { $0.hasSuffix(".tmp") }
        #expect(leftovers.isEmpty)
    }

    @Test func aCorruptedBundleIsRefusedAndNothingIsKept() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-repo-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let model = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch\n"], name: "echo")
        let (_, published) = try await RepositoryPublisher(root: root).publish(directory: model) { manifest, bundle in
            try manifest.publish(name: "echo", bundle: bundle)
        }
        let sha = try #require(published)
        let file = root.appendingPathComponent("bundles/\(sha).tar.gz")
        var bytes = try Data(contentsOf: file)
        bytes[bytes.count / 2] ^= 0xFF
        try bytes.write(to: file)
        let store = BundleStore(root: root.appendingPathComponent("node-cache"))
        let error = try await #require(throws: SidecarError.self) {
            _ = try await store.directory(for: sha, from: DirectoryRepository(root: root), attempts: 2, logger: Fixtures.logger)
        }
        #expect(error.message.contains("corrupted or truncated"))
        #expect(store.archive(sha) == nil)
        #expect(!FileManager.default.fileExists(atPath: store.unpackedURL(sha).path))
    }

    // MARK: A real host

    @Test func aRolloutSwitchesOnlyOnceTheNewVersionIsReadyAndABadBundleLeavesItServing() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-repo-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let publisher = RepositoryPublisher(root: root)
        let v1 = try Fixtures.model(["handler.py": "def predict(batch):\n    return [1 for _ in batch]\n"], name: "m")
        let v2 = try Fixtures.model(["handler.py": "def predict(batch):\n    return [2 for _ in batch]\n"], name: "m")
        _ = try await publisher.publish(directory: v1) { try $0.publish(name: "m", bundle: $1, workers: 1) }

        try await withModelHost(options: Fixtures.hostOptions, logger: Fixtures.logger) { host in
            let sync = RepositorySync(
                source: DirectoryRepository(root: root), host: host, store: BundleStore(root: root.appendingPathComponent("node")),
                drainDelay: .milliseconds(200), logger: Fixtures.logger)
            await sync.pass()
            #expect(sync.isCaughtUp)
            #expect(try await host.resolve("m").predict(Fixtures.json("0")) == Fixtures.json("1"))

            _ = try await publisher.publish(directory: v2) { try $0.publish(name: "m", bundle: $1) }
            await sync.pass()
            #expect(try await host.resolve("m").predict(Fixtures.json("0")) == Fixtures.json("2"))
            #expect(host.versions(of: "m")?.loaded == ["2"], "version 1 drained and unloaded")

            // Version 3's bundle is corrupted in the repository: refused, version 2 keeps serving.
            let v3 = try Fixtures.model(["handler.py": "def predict(batch):\n    return [3 for _ in batch]\n"], name: "m")
            let (_, sha3) = try await publisher.publish(directory: v3) { try $0.publish(name: "m", bundle: $1) }
            let file = root.appendingPathComponent("bundles/\(sha3!).tar.gz")
            try Data(try Data(contentsOf: file).prefix(40)).write(to: file)  // truncated
            await sync.pass()
            #expect(try await host.resolve("m").predict(Fixtures.json("0")) == Fixtures.json("2"))
            let error = sync.status.models["m"]?.error ?? ""
            #expect(error.contains("version 3") && error.contains("corrupted or truncated"), "\(error)")

            // Rolling back to version 1 reuses its bundle on disk (nothing fetched).
            _ = try await publisher.publish(directory: nil) { manifest, _ in _ = try manifest.rollback(name: "m", to: "1") }
            let fetchedBefore = sync.status.bytesFetched
            await sync.pass()
            #expect(try await host.resolve("m").predict(Fixtures.json("0")) == Fixtures.json("1"))
            #expect(sync.status.bytesFetched == fetchedBefore)
            #expect(sync.status.models["m"]?.error == nil)
        }
    }
}
