import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Sidecar
import Testing
@testable import SidecarFront

/// Every HTTP endpoint through the router (no socket), against a host with real Python workers.
@Suite(.serialized) struct HTTPFrontTests {
    func withFront(maxBody: Int = 1 << 20, _ body: @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        let typed = try FrontFixtures.typedModel()
        let echo = try FrontFixtures.echoModel()
        let slow = try FrontFixtures.slowModel()
        try await withModelHost(options: FrontFixtures.hostOptions, logger: FrontFixtures.logger) { host in
            try await host.load(typed.path)
            try await host.load(echo.path)
            try await host.load(slow.path)
            let front = HTTPFront(
                host: host, readiness: ServerReadiness(host: host, loaded: true), metrics: FrontMetrics.shared(), maxBodyBytes: maxBody)
            try await Application(router: front.router()).test(.router) { client in try await body(client) }
        }
    }

    func json(_ response: TestResponse) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(buffer: response.body)) as? [String: Any] ?? [:]
    }

    @Test func healthAndMetadata() async throws {
        try await withFront { client in
            try await client.execute(uri: "/v2/health/live", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2/health/ready", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2", method: .get) { response in
                let body = try json(response)
                #expect(body["name"] as? String == "sidecar")
            }
            try await client.execute(uri: "/v2/models/typed", method: .get) { response in
                let body = try json(response)
                #expect(body["versions"] as? [String] == ["1"])
                let inputs = body["inputs"] as? [[String: Any]]
                #expect(inputs?.first?["name"] as? String == "x")
                #expect(inputs?.first?["shape"] as? [Int] == [-1, 4])
            }
            try await client.execute(uri: "/v2/models/typed/versions/1", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2/models/typed/versions/2", method: .get) { #expect($0.status == .notFound) }
            try await client.execute(uri: "/v2/models/typed/ready", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2/models/nope/ready", method: .get) { #expect($0.status == .notFound) }
        }
    }

    @Test func inferJSONAndBinary() async throws {
        try await withFront { client in
            let request = #"{"id": "a", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]}"#
            try await client.execute(uri: "/v2/models/typed/infer", method: .post, body: ByteBuffer(string: request)) { response in
                #expect(response.status == .ok)
                let body = try json(response)
                #expect(body["id"] as? String == "a")
                #expect(body["model_name"] as? String == "typed")
                let outputs = body["outputs"] as? [[String: Any]] ?? []
                let doubled = outputs.first { $0["name"] as? String == "doubled" }
                #expect(doubled?["data"] as? [Double] == [2, 4, 6, 8])
                #expect(doubled?["datatype"] as? String == "FP32")
                #expect(outputs.first { $0["name"] as? String == "label" }?["data"] as? [String] == ["ok"])
            }
            // The binary tensor extension, as tritonclient.http sends it by default.
            let header = #"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}], "outputs": [{"name": "doubled", "parameters": {"binary_data": true}}]}"#
            var body = ByteBuffer(string: header)
            body.writeData(FrontFixtures.fp32Data([1, 2, 3, 4]))
            try await client.execute(
                uri: "/v2/models/typed/infer", method: .post,
                headers: [HTTPFront.inferenceHeaderLength: "\(header.utf8.count)"], body: body
            ) { response in
                #expect(response.status == .ok)
                let length = try #require(response.headers[HTTPFront.inferenceHeaderLength].flatMap { Int($0) })
                let payload = Data(buffer: response.body)
                #expect(payload.suffix(from: payload.startIndex + length) == FrontFixtures.fp32Data([2, 4, 6, 8]))
                let meta = try JSONSerialization.jsonObject(with: payload.prefix(length)) as! [String: Any]
                #expect((meta["outputs"] as! [[String: Any]]).map { $0["name"] as! String } == ["doubled"])
            }
        }
    }

    @Test func kserveV1() async throws {
        try await withFront { client in
            try await client.execute(
                uri: "/v1/models/echo:predict", method: .post, body: ByteBuffer(string: #"{"instances": [[1, 2], {"a": "b"}, "s", null]}"#)
            ) { response in
                #expect(response.status == .ok)
                #expect(String(buffer: response.body) == #"{"predictions":[[1,2],{"a":"b"},"s",null]}"#)
            }
            try await client.execute(uri: "/v1/models/nope:predict", method: .post, body: ByteBuffer(string: #"{"instances": []}"#)) {
                #expect($0.status == .notFound)
            }
            try await client.execute(uri: "/v1/models/echo:predict", method: .post, body: ByteBuffer(string: #"{"rows": []}"#)) { response in
                #expect(response.status == .badRequest)
                let body = try json(response)
                #expect(body["error"] as? String == "malformed request: missing field 'instances'")
            }
        }
    }

    @Test func badRequestsGetTheRightStatusAndAMessage() async throws {
        try await withFront(maxBody: 10_000) { client in
            let cases: [(String, String, HTTPResponse.Status, String)] = [
                ("/v2/models/nope/infer", "{}", .notFound, "no model named 'nope'"),
                ("/v2/models/typed/infer", "{oops", .badRequest, "not valid JSON"),
                ("/v2/models/typed/infer", #"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}"#, .badRequest, "needs 16 bytes"),
                ("/v2/models/typed/infer", #"{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}"#, .badRequest, "must have shape [-1, 4]"),
                ("/v2/models/typed/infer", #"{"inputs": [{"name": "x", "shape": [4], "datatype": "FP99", "data": [1, 2, 3, 4]}]}"#, .badRequest, "unknown datatype 'FP99'"),
                ("/v2/models/typed/infer", #"{"inputs": []}"#, .badRequest, "lacks input 'x'"),
                ("/v2/models/typed/infer", #"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [-1, 2, 3, 4]}]}"#, .internalServerError, "ValueError: negative input"),
                ("/v2/models/typed/infer", String(repeating: " ", count: 20_000), .contentTooLarge, "exceeds the limit of 10000 bytes"),
            ]
            for (uri, body, status, message) in cases {
                try await client.execute(uri: uri, method: .post, body: ByteBuffer(string: body)) { response in
                    #expect(response.status == status, "\(uri) \(body.prefix(60))")
                    let error = try json(response)["error"] as? String ?? ""
                    #expect(error.contains(message), "\(error) should contain \(message)")
                }
            }
            // Good requests still work after all that.
            try await client.execute(
                uri: "/v2/models/typed/infer", method: .post,
                body: ByteBuffer(string: #"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#)
            ) { #expect($0.status == .ok) }
        }
    }

    @Test func deadlinesFromTheHeaderOrTheTimeoutParameterAnswer504() async throws {
        try await withFront { client in
            var headers = HTTPFields()
            headers[HTTPField.Name("Sidecar-Timeout-Ms")!] = "100"
            let start = ContinuousClock.now
            try await client.execute(
                uri: "/v1/models/slow:predict", method: .post, headers: headers, body: ByteBuffer(string: #"{"instances": [1]}"#)
            ) { response in
                #expect(response.status == .gatewayTimeout)
                let error = try json(response)["error"] as? String
                // The budget counts from the request's arrival in the batcher, a moment after the
                // front read the header: a loaded machine shows a few ms less than the 100 sent.
                let allowed = error?.firstMatch(of: /deadline passed \((\d+) ms allowed/).flatMap { Int($0.1) }
                #expect(allowed.map { (50...100).contains($0) } == true, "\(error ?? "")")
            }
            #expect(ContinuousClock.now - start < .milliseconds(450), "answered at the deadline, not after the batch")
            let oip = #"{"parameters": {"timeout": 100000}, "inputs": [{"name": "i", "shape": [1], "datatype": "INT32", "data": [1]}]}"#
            try await client.execute(uri: "/v2/models/slow/infer", method: .post, body: ByteBuffer(string: oip)) { response in
                #expect(response.status == .gatewayTimeout)
            }
            headers[HTTPField.Name("Sidecar-Timeout-Ms")!] = "soon"
            try await client.execute(
                uri: "/v1/models/echo:predict", method: .post, headers: headers, body: ByteBuffer(string: #"{"instances": [1]}"#)
            ) { response in
                #expect(response.status == .badRequest)
                let error = try json(response)["error"] as? String
                #expect(error?.contains("Sidecar-Timeout-Ms") == true)
            }
            // A generous deadline changes nothing.
            headers[HTTPField.Name("Sidecar-Timeout-Ms")!] = "5000"
            try await client.execute(
                uri: "/v1/models/echo:predict", method: .post, headers: headers, body: ByteBuffer(string: #"{"instances": [1]}"#)
            ) { #expect($0.status == .ok) }
        }
    }

    @Test func statusShowsEveryModelAndWorker() async throws {
        try await withFront { client in
            try await client.execute(uri: "/status", method: .get) { response in
                #expect(response.status == .ok)
                let models = try json(response)["models"] as? [[String: Any]] ?? []
                #expect(models.compactMap { $0["name"] as? String } == ["echo", "slow", "typed"])
                for model in models {
                    #expect(model["state"] as? String == "ready")
                    #expect(model["reason"] is NSNull)
                    #expect(model["detail"] is NSNull)
                    let workers = model["workers"] as? [[String: Any]] ?? []
                    #expect(workers.count == 1)
                    #expect((workers.first?["pid"] as? Int ?? 0) > 0)
                    #expect(["ready", "busy"].contains(workers.first?["state"] as? String ?? ""))
                    #expect(workers.first?["last_error"] is NSNull, "a healthy worker's last_error is an explicit null")
                }
            }
            // RSS is sampled at each ping (every second): it shows up shortly after start.
            var rss: Int?
            for _ in 0..<60 where rss == nil {
                try await client.execute(uri: "/status/echo", method: .get) { response in
                    rss = ((try json(response)["workers"] as? [[String: Any]])?.first?["rss_bytes"] as? Int)
                }
                if rss == nil { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect((rss ?? 0) > 1 << 20, "a Python worker's resident memory, in bytes")
            try await client.execute(uri: "/v1/models/echo:predict", method: .post, body: ByteBuffer(string: #"{"instances": [1, 2]}"#)) { _ in }
            try await client.execute(uri: "/status/echo", method: .get) { response in
                let body = try json(response)
                let worker = (body["workers"] as? [[String: Any]])?.first
                #expect(worker?["items_served"] as? Int == 2)
                #expect(worker?["restarts"] as? Int == 0)
            }
            try await client.execute(uri: "/status/nope", method: .get) { #expect($0.status == .notFound) }
        }
    }

    @Test func metricsExposition() async throws {
        try await withFront { client in
            try await client.execute(uri: "/v1/models/echo:predict", method: .post, body: ByteBuffer(string: #"{"instances": [1]}"#)) { _ in }
            try await client.execute(uri: "/v1/models/made-up-4711:predict", method: .post, body: ByteBuffer(string: #"{"instances": [1]}"#)) {
                #expect($0.status == .notFound)
            }
            try await client.execute(uri: "/metrics", method: .get) { response in
                let text = String(buffer: response.body)
                #expect(!text.contains("made-up-4711"), "an unknown model's name must not become a label")
                #expect(text.contains(#"sidecar_request_errors_total{model="_unknown",protocol="kserve_v1",code="not_found"}"#))
                #expect(text.contains(#"sidecar_requests_total{model="echo",protocol="kserve_v1"}"#))
                #expect(text.contains(#"sidecar_batch_size_bucket{model="echo""#))
                #expect(text.contains(#"sidecar_workers{model="typed",state="ready"} 1"#))
                #expect(text.contains(#"sidecar_queue_depth{model="echo"}"#))
                #expect(text.contains(#"sidecar_model_failed{model="echo"} 0.0"#))
                #expect(text.contains(#"sidecar_worker_items_served{model="echo",worker="0"} 1.0"#))
                #expect(text.contains(#"sidecar_worker_rss_bytes{model="echo",worker="0"}"#))
            }
        }
    }
}
