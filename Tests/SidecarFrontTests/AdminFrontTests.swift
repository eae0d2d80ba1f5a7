import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Sidecar
import Testing
@testable import SidecarFront

/// The admin API through its router (no socket), against a host with real Python workers.
@Suite(.serialized) struct AdminFrontTests {
    static let token = "s3cret-token"

    func withAdmin(token: String? = AdminFrontTests.token, _ body: @Sendable (any TestClientProtocol, ModelHost) async throws -> Void) async throws {
        let echo = try FrontFixtures.echoModel()
        try await withModelHost(options: FrontFixtures.hostOptions, logger: FrontFixtures.logger) { host in
            try await host.load(echo.path)
            let bundles = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-bundles-\(UUID().uuidString.prefix(8))")
            let admin = AdminFront(host: host, token: token, bundleDirectory: bundles, bundleLimits: .init(maxCompressedBytes: 1 << 20))
            try await Application(router: admin.router()).test(.router) { client in try await body(client, host) }
        }
    }

    var authorized: HTTPFields {
        var headers = HTTPFields()
        headers[.authorization] = "Bearer \(Self.token)"
        return headers
    }

    func json(_ response: TestResponse) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(buffer: response.body)) as? [String: Any] ?? [:]
    }

    @Test func missingOrWrongTokenIsRefused() async throws {
        try await withAdmin { client, host in
            try await client.execute(uri: "/admin/v1/models", method: .get) { response in
                #expect(response.status == .unauthorized)
                let message = try json(response)["error"] as? String ?? ""
                #expect(message.contains("Authorization: Bearer"), "\(message)")
            }
            var wrong = HTTPFields()
            wrong[.authorization] = "Bearer guess"
            try await client.execute(uri: "/admin/v1/models/echo", method: .delete, headers: wrong) { #expect($0.status == .forbidden) }
            #expect(host.model(named: "echo") != nil, "a refused request changes nothing")
            try await client.execute(uri: "/admin/v1/models", method: .get, headers: authorized) { #expect($0.status == .ok) }
        }
    }

    @Test func listScaleLoadAndUnload() async throws {
        try await withAdmin { client, host in
            try await client.execute(uri: "/admin/v1/models", method: .get, headers: authorized) { response in
                let models = try json(response)["models"] as? [[String: Any]] ?? []
                #expect(models.count == 1)
                #expect(models.first?["name"] as? String == "echo")
                #expect(models.first?["workers_ready"] as? Int == 1)
                #expect(models.first?["state"] as? String == "ready")
            }
            try await client.execute(
                uri: "/admin/v1/models/echo/workers", method: .put, headers: authorized, body: ByteBuffer(string: #"{"workers": 3}"#)
            ) { response in
                #expect(response.status == .ok)
                let body = try json(response)
                #expect(body["workers_ready"] as? Int == 3)
                #expect(body["workers_target"] as? Int == 3)
            }
            try await client.execute(
                uri: "/admin/v1/models/echo/workers", method: .put, headers: authorized, body: ByteBuffer(string: #"{"workers": 0}"#)
            ) { #expect($0.status == .badRequest) }
            // Without waiting: 202 at once, the change completes in the background.
            try await client.execute(
                uri: "/admin/v1/models/echo/workers", method: .put, headers: authorized, body: ByteBuffer(string: #"{"workers": 1, "wait": false}"#)
            ) { #expect($0.status == .accepted) }
            #expect(await eventually { host.model(named: "echo")?.workers.count == 1 })
            try await client.execute(
                uri: "/admin/v1/models/nope/workers", method: .put, headers: authorized, body: ByteBuffer(string: #"{"workers": 2}"#)
            ) { #expect($0.status == .notFound) }

            let other = try FrontFixtures.echoModel()
            let load = #"{"directory": "\#(other.path)", "name": "echo2", "workers": 2}"#
            try await client.execute(uri: "/admin/v1/models", method: .post, headers: authorized, body: ByteBuffer(string: load)) { response in
                #expect(response.status == .created)
                let ready = try json(response)["workers_ready"] as? Int
                #expect(ready == 2)
            }
            try await client.execute(uri: "/admin/v1/models", method: .post, headers: authorized, body: ByteBuffer(string: load)) { response in
                #expect(response.status == .conflict)
                let message = try json(response)["error"] as? String ?? ""
                #expect(message.contains("already loaded"), "\(message)")
            }
            #expect(try await host.model(named: "echo2")?.predict(FrontFixtures.json("7")).json == "7")
            try await client.execute(uri: "/admin/v1/models/echo2", method: .delete, headers: authorized) { #expect($0.status == .ok) }
            #expect(host.model(named: "echo2") == nil)
            try await client.execute(uri: "/admin/v1/models/echo2", method: .delete, headers: authorized) { #expect($0.status == .notFound) }
        }
    }

    @Test func uploadedBundleIsCheckedThenLoaded() async throws {
        try await withAdmin { client, host in
            let source = try FrontFixtures.echoModel()
            let packed = try await BundleArchive.pack(directory: source)
            var headers = authorized
            headers[AdminFront.sha256Header] = String(repeating: "0", count: 64)
            try await client.execute(
                uri: "/admin/v1/bundles?name=up", method: .post, headers: headers, body: ByteBuffer(data: packed.data)
            ) { response in
                #expect(response.status == .badRequest)
                let message = try json(response)["error"] as? String ?? ""
                #expect(message.contains("sha256"), "\(message)")
            }
            #expect(host.model(named: "up") == nil)
            headers[AdminFront.sha256Header] = packed.sha256
            try await client.execute(
                uri: "/admin/v1/bundles?name=up", method: .post, headers: headers, body: ByteBuffer(data: packed.data)
            ) { response in
                #expect(response.status == .created, "\(String(buffer: response.body))")
            }
            #expect(try await host.model(named: "up")?.predict(FrontFixtures.json("\"x\"")).json == "\"x\"")
            let unpacked = try #require(host.model(named: "up")?.bundle.directory)
            #expect(FileManager.default.fileExists(atPath: unpacked.appendingPathComponent("handler.py").path))
            try await client.execute(uri: "/admin/v1/models/up", method: .delete, headers: authorized) { #expect($0.status == .ok) }
            #expect(!FileManager.default.fileExists(atPath: unpacked.path), "an unloaded bundle's files are removed")
            try await client.execute(
                uri: "/admin/v1/bundles?name=big", method: .post, headers: headers, body: ByteBuffer(repeating: 0, count: 2 << 20)
            ) { #expect($0.status == .contentTooLarge) }
        }
    }
}

