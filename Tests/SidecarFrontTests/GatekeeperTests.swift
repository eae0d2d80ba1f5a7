import Crypto
import Foundation
import Testing
@testable import SidecarFront

/// API keys, their file, rate limits and the edge's configuration, without a server.
@Suite struct GatekeeperTests {
    func keysFile(_ text: String) throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("keys-\(UUID().uuidString).yaml")
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    func hash(_ key: String) -> String { SHA256.hash(data: Data(key.utf8)).map { String(format: "%02x", $0) }.joined() }

    func gatekeeper(_ keys: String, rates: [String: RateLimit] = [:], open: Set<EndpointCategory> = EndpointCategory.openByDefault) throws -> Gatekeeper {
        var configuration = EdgeConfiguration()
        configuration.open = open
        configuration.keysFile = try keysFile(keys)
        configuration.modelRates = rates
        return try Gatekeeper(configuration: configuration)
    }

    @Test func keysAreMatchedByTheirHashAndLimitedToTheirModels() throws {
        let gate = try gatekeeper("""
            keys:
              - {name: alice, sha256: \(hash("a-key"))}
              - {name: bob, sha256: \(hash("b-key")), models: [iris]}
            """)
        func headers(_ pairs: [String: String]) -> (String) -> String? { { pairs[$0] } }
        #expect(try gate.authenticate(headers(["authorization": "Bearer a-key"]))?.name == "alice")
        #expect(try gate.authenticate(headers(["authorization": "bearer a-key"]))?.name == "alice")
        #expect(try gate.authenticate(headers(["x-api-key": "b-key"]))?.name == "bob")
        for bad in [[:], ["authorization": "Bearer nope"], ["authorization": "Basic a-key"], ["x-api-key": ""]] {
            #expect(throws: FrontError.self) { try gate.authenticate(headers(bad)) }
            do { _ = try gate.authenticate(headers(bad)) } catch let error as FrontError { #expect(error.code == .unauthenticated) }
        }
        let bob = try gate.authenticate(headers(["x-api-key": "b-key"]))
        try gate.admit(bob, model: "iris", known: true)
        do {
            try gate.admit(bob, model: "echo", known: true)
            Issue.record("bob may not call echo")
        } catch let error as FrontError {
            #expect(error.code == .permissionDenied)
            #expect(error.status == .forbidden)
        }
        // Open endpoints need no key; the others do.
        try gate.check(.metadata, headers([:]))
        let closed = try gatekeeper("keys:\n  - {name: alice, sha256: \(hash("a-key"))}\n", open: [.health])
        try closed.check(.health, headers([:]))
        #expect(throws: FrontError.self) { try closed.check(.metadata, headers(["x-api-key": "wrong"])) }
        try closed.check(.metrics, headers(["x-api-key": "a-key"]))
    }

    @Test func aKeyOverItsRateIsRefusedWithRetryAfterAndTheBucketRefills() async throws {
        let gate = try gatekeeper("keys:\n  - {name: alice, sha256: \(hash("sk-never-in-a-message")), rate: 20, burst: 3}\n")
        let key = try gate.authenticate { $0 == "x-api-key" ? "sk-never-in-a-message" : nil }
        for _ in 0..<3 { try gate.admit(key, model: "m", known: true) }
        do {
            try gate.admit(key, model: "m", known: true)
            Issue.record("the fourth request is over the burst")
        } catch let error as FrontError {
            #expect(error.code == .rateLimited)
            #expect(error.retryAfter == 1)
            #expect(error.message.contains("'alice'"))
            #expect(!error.message.contains("sk-never-in-a-message"))
        }
        try await Task.sleep(for: .milliseconds(120))  // 20/s: two tokens back
        try gate.admit(key, model: "m", known: true)
    }

    @Test func aModelRateAppliesWithoutKeysAndARefusalCostsNoToken() throws {
        var configuration = EdgeConfiguration()
        configuration.modelRates = ["iris": RateLimit(rate: 0.001, burst: 2)]
        let gate = try Gatekeeper(configuration: configuration)
        #expect(gate.isActive && !gate.requiresKeys)
        try gate.admit(nil, model: "iris", known: true)
        try gate.admit(nil, model: "iris", known: true)
        #expect(throws: FrontError.self) { try gate.admit(nil, model: "iris", known: true) }
        try gate.admit(nil, model: "other", known: true)  // its own bucket: unlimited
    }

    @Test func badKeysFilesAreRefusedNamingWhatIsWrong() throws {
        for (text, named) in [
            ("keys: 3", "must be a mapping with 'keys:'"),
            ("keys:\n  - {name: a}", "needs name and sha256"),
            ("keys:\n  - {name: a, sha256: xyz}", "sha256 must be 64 hex digits"),
            ("keys:\n  - {name: a, sha256: \(hash("1"))}\n  - {name: a, sha256: \(hash("2"))}", "appears twice"),
            ("keys:\n  - {name: a, sha256: \(hash("1")), colour: red}", "unknown key 'keys[0].colour'"),
        ] {
            do {
                _ = try APIKeys.read(file: try keysFile(text))
                Issue.record("accepted: \(text)")
            } catch {
                #expect("\(error)".contains(named), "\(error)")
                #expect("\(error)".contains("auth.keys_file"))
            }
        }
        do {
            _ = try APIKeys.read(file: "/nonexistent/keys.yaml")
            Issue.record("accepted a missing file")
        } catch { #expect("\(error)".contains("auth.keys_file /nonexistent/keys.yaml: cannot read it")) }
    }

    @Test func theEdgeBlocksOfTheServerConfigurationAreReadWithTheirNames() throws {
        let keys = try keysFile("keys:\n  - {name: a, sha256: \(hash("1"))}\n")
        let configuration = try ServerConfigurationFile.read(
            yaml: """
                tls: {cert_file: /etc/s.crt, key_file: s.key, client_ca_file: ca.crt}
                auth: {keys_file: \(keys), open: [health]}
                rate_limits: {iris: {rate: 100, burst: 20}, echo: {rate: 5}}
                limits: {max_connections: 100, request_timeout_s: 2, idle_timeout_s: 3.5}
                """, path: "/srv/sidecar/server.yaml")
        let edge = configuration.edge
        #expect(edge.tls == .init(certFile: "/etc/s.crt", keyFile: "/srv/sidecar/s.key", clientCAFile: "/srv/sidecar/ca.crt"))
        #expect(edge.keysFile == keys)
        #expect(edge.open == [.health])
        #expect(edge.modelRates == ["iris": RateLimit(rate: 100, burst: 20), "echo": RateLimit(rate: 5, burst: 5)])
        #expect(edge.maxConnections == 100)
        #expect(edge.requestTimeout == .seconds(2))
        #expect(edge.idleTimeout == .milliseconds(3500))
        for (yaml, named) in [
            ("tls: {cert_file: a}", "'tls' needs both cert_file and key_file"),
            ("auth: {open: [health]}", "'auth' needs keys_file"),
            ("auth: {keys_file: k, open: [everything]}", "'auth.open'"),
            ("rate_limits: {iris: {rate: -1}}", "'rate_limits.iris.rate'"),
            ("limits: {max_connections: 0}", "'limits.max_connections'"),
            ("limits: {slow: 1}", "unknown key 'limits.slow'"),
        ] {
            do {
                _ = try ServerConfigurationFile.read(yaml: yaml, path: "s.yaml")
                Issue.record("accepted: \(yaml)")
            } catch { #expect("\(error)".contains(named), "\(error)") }
        }
    }
}
