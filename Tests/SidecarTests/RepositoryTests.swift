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

    @Test func aVersionThatChangesOnlyTheHandlerMovesOnlyTheHandler() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-repo-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: root) }
        let weights = String((0..<200_000).map { _ in "0123456789abcdef".randomElement()! })
        let v1 = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch\n", "weights/w.bin": weights], name: "m")
        let v2 = try Fixtures.model(["handler.py": "def predict(batch):\n    return batch  # v2\n", "weights/w.bin": weights], name: "m")
        let publisher = RepositoryPublisher(root: root)
        let source = DirectoryRepository(root: root)
        let store = BundleStore(root: root.appendingPathComponent("node"))
        var moved: [Int] = []
        for directory in [v1, v2] {
            let (manifest, sha) = try await publisher.publish(directory: directory) { try $0.publish(name: "m", bundle: $1) }
            let version = try #require(manifest.models["m"]?.versions.first)
            #expect(version.files != nil, "a directory of plain files gets a file index")
            var bytes = 0
            let unpacked = try await store.directory(for: sha!, files: version.files, from: source, logger: Fixtures.logger) { bytes += $0 }
            moved.append(bytes)
            #expect(try String(contentsOf: unpacked.appendingPathComponent("weights/w.bin"), encoding: .utf8) == weights)
        }
        #expect(moved[0] > 200_000)
        #expect(moved[1] < 2_000, "version 2 moved \(moved[1]) bytes: the handler and the index, not the weights")
        // Old bundles go, and with them the files no kept bundle lists.
        let (_, sha2) = try await publisher.publish(directory: v2) { try $0.publish(name: "m", bundle: $1) }
        store.collect(keeping: [sha2!], logger: Fixtures.logger)
        let files = try FileManager.default.contentsOfDirectory(atPath: store.filesURL.path)
        #expect(files.count == 2, "v2's handler and the weights: \(files)")
    }

    @Test func aFileIndexThatLeavesTheBundleIsRefused() throws {
        let sha = String(repeating: "d", count: 64)
        for path in ["../x", "/etc/passwd", "a/../../b", "a//b", "."] {
            let index = #"{"format": 1, "entries": [{"path": "\#(path)", "kind": "file", "sha256": "\#(sha)", "size": 1}]}"#
            #expect(throws: SidecarError.self, "\(path)") { try BundleIndex.decode(Data(index.utf8), limits: .init()) }
        }
        let huge = #"{"format": 1, "entries": [{"path": "w", "kind": "file", "sha256": "\#(sha)", "size": 9223372036854775807}, {"path": "v", "kind": "file", "sha256": "\#(sha)", "size": 9223372036854775807}]}"#
        #expect(throws: SidecarError.self) { try BundleIndex.decode(Data(huge.utf8), limits: .init()) }
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
            // ... and so is its handler in files/, which a node fetches first.
            let handler = BundleArchive.sha256Hex(of: try Data(contentsOf: v3.appendingPathComponent("handler.py")))
            try Data("def predict(batch):\n    return [666 for _ in batch]\n".utf8).write(to: root.appendingPathComponent("files/\(handler)"))
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
