import Foundation
import GRPCCore
import AsyncHTTPClient
import GRPCNIOTransportHTTP2
import NIOFoundationCompat
import Sidecar
import SidecarOIPProtocol
import Testing
@testable import SidecarFront

/// The gRPC services through a real server on real sockets (port 0), called with grpc-swift clients.
@Suite(.serialized) struct GRPCFrontTests {
    /// Runs a server with the typed, echo and slow models; `body` gets a gRPC client and the HTTP port.
    func withServer(_ body: @Sendable (GRPCClient<HTTP2ClientTransport.Posix>, Int) async throws -> Void) async throws {
        var configuration = ServerConfiguration()
        configuration.models = [try FrontFixtures.typedModel().path, try FrontFixtures.echoModel().path, try FrontFixtures.slowModel().path]
        configuration.httpPort = 0
        configuration.grpcPort = 0
        configuration.adminPort = nil
        configuration.maxGRPCMessageBytes = 1 << 20
        configuration.hostOptions = FrontFixtures.hostOptions
        let (ports, sink) = AsyncStream.makeStream(of: ListeningPorts.self)
        let server = Task { [configuration] in
            try await runServer(configuration, logger: FrontFixtures.logger) { ports in sink.yield(ports) }
        }
        defer { server.cancel() }
        var iterator = ports.makeAsyncIterator()
        let listening = try #require(await iterator.next())
        let port = listening.grpc
        try await withGRPCClient(
            transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)
        ) { client in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            let deadline = ContinuousClock.now.advanced(by: .seconds(240))
            while try await !inference.serverReady(.init()).ready {
                guard ContinuousClock.now < deadline else { Issue.record("server never became ready"); return }
                try await Task.sleep(for: .milliseconds(100))
            }
            try await body(client, listening.http)
        }
        server.cancel()
        _ = await server.result
    }

    static func request(_ values: [Float], model: String = "typed", shape: [Int64] = [1, 4]) -> Inference_ModelInferRequest {
        .with {
            $0.modelName = model
            $0.id = "r"
            $0.inputs = [.with { $0.name = "x"; $0.datatype = "FP32"; $0.shape = shape }]
            $0.rawInputContents = [FrontFixtures.fp32Data(values)]
        }
    }

    @Test func inferenceService() async throws {
        try await withServer { client, _ in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            #expect(try await inference.serverLive(.init()).live)
            #expect(try await inference.modelReady(.with { $0.name = "typed" }).ready)
            #expect(try await inference.serverMetadata(.init()).name == "sidecar")

            let metadata = try await inference.modelMetadata(.with { $0.name = "typed" })
            #expect(metadata.inputs.map(\.name) == ["x"])
            #expect(metadata.inputs.first?.shape == [-1, 4])
            let config = try await inference.modelConfig(.with { $0.name = "typed" })
            #expect(config.config.input.first?.dataType == .typeFp32)

            // Raw contents in, raw contents out.
            let raw = try await inference.modelInfer(Self.request([1, 2, 3, 4]))
            #expect(raw.id == "r")
            let doubled = try #require(raw.outputs.firstIndex { $0.name == "doubled" })
            #expect(raw.rawOutputContents[doubled] == FrontFixtures.fp32Data([2, 4, 6, 8]))
            let label = try #require(raw.outputs.firstIndex { $0.name == "label" })
            #expect(raw.outputs[label].datatype == "BYTES")
            #expect(raw.rawOutputContents[label] == (try Tensor.bytesData([Data("ok".utf8)])))

            // Typed contents in; a requested subset of outputs.
            let typed = try await inference.modelInfer(.with {
                $0.modelName = "typed"
                $0.inputs = [.with { $0.name = "x"; $0.datatype = "FP32"; $0.shape = [1, 4]; $0.contents.fp32Contents = [1, 1, 1, 1] }]
                $0.outputs = [.with { $0.name = "doubled" }]
            })
            #expect(typed.outputs.map(\.name) == ["doubled"])
            #expect(typed.rawOutputContents == [FrontFixtures.fp32Data([2, 2, 2, 2])])

            // BYTES through the echo model.
            let bytes = try await inference.modelInfer(.with {
                $0.modelName = "echo"
                $0.inputs = [.with { $0.name = "s"; $0.datatype = "BYTES"; $0.shape = [2]; $0.contents.bytesContents = [Data("é".utf8), Data()] }]
            })
            #expect(bytes.rawOutputContents == [try Tensor.bytesData([Data("é".utf8), Data()])])
        }
    }

    @Test func deadlinesAnswerDeadlineExceeded() async throws {
        try await withServer { client, httpPort in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            var slow = Inference_ModelInferRequest.with {
                $0.modelName = "slow"
                $0.inputs = [.with { $0.name = "i"; $0.datatype = "INT32"; $0.shape = [1]; $0.contents.intContents = [1] }]
            }
            // The OIP `timeout` parameter (µs): the server answers DEADLINE_EXCEEDED itself.
            slow.parameters["timeout"] = .with { $0.int64Param = 100_000 }
            let error = await #expect(throws: RPCError.self) { try await inference.modelInfer(slow) }
            #expect(error?.code == .deadlineExceeded, "\(String(describing: error))")
            // A gRPC deadline. The client enforces it too, so what shows the server honours it is
            // that the expired request never runs (its deadline, and grpc-swift's cancellation at the
            // deadline, both withdraw it): fill the worker's window with two half-second batches, queue
            // one with a 100 ms deadline behind them, and count what the worker ran.
            slow.parameters = [:]
            let plain = slow
            let first = Task { try await inference.modelInfer(plain) }
            try await Task.sleep(for: .milliseconds(100))
            let second = Task { try await inference.modelInfer(plain) }
            try await Task.sleep(for: .milliseconds(100))
            var options = CallOptions.defaults
            options.timeout = .milliseconds(100)
            let late = await #expect(throws: RPCError.self) { try await inference.modelInfer(slow, options: options) }
            #expect(late?.code == .deadlineExceeded)
            _ = try await (first.value, second.value)
            try await Task.sleep(for: .milliseconds(700))  // past when the expired one would have finished
            let status = try await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(httpPort)/status/slow"), timeout: .seconds(10))
            let body = try JSONSerialization.jsonObject(with: Data(buffer: try await status.body.collect(upTo: 1 << 20))) as? [String: Any]
            let served = (body?["workers"] as? [[String: Any]])?.reduce(0) { $0 + ($1["items_served"] as? Int ?? 0) }
            #expect(served == 3, "the parameter-timeout request and the two plain ones; not the expired one")
            // Negative timeouts are refused.
            slow.parameters["timeout"] = .with { $0.int64Param = -1 }
            let bad = await #expect(throws: RPCError.self) { try await inference.modelInfer(slow) }
            #expect(bad?.code == .invalidArgument)
        }
    }

    @Test func errorsCarryTheRightCodes() async throws {
        try await withServer { client, _ in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            let cases: [(Inference_ModelInferRequest, RPCError.Code, String)] = [
                (Self.request([1, 2, 3, 4], model: "nope"), .notFound, "no model named 'nope'"),
                (Self.request([1, 2, 3], shape: [1, 3]), .invalidArgument, "must have shape [-1, 4]"),
                (Self.request([1, 2, 3], shape: [1, 4]), .invalidArgument, "needs 16 bytes"),
                (Self.request([-1, 2, 3, 4]), .internalError, "ValueError: negative input"),
                (Self.request(Array(repeating: 1, count: 300_000), shape: [75_000, 4]), .resourceExhausted, "over the limit of 1048576"),
            ]
            for (request, code, message) in cases {
                let error = await #expect(throws: RPCError.self) { try await inference.modelInfer(request) }
                #expect(error?.code == code, "\(String(describing: error))")
                #expect(error?.message.contains(message) == true, "\(error?.message ?? "") should contain \(message)")
            }
            let stillGood = try await inference.modelInfer(Self.request([1, 2, 3, 4]))
            #expect(stillGood.outputs.count == 2)
        }
    }

    @Test func streamingAnswersEveryRequest() async throws {
        try await withServer { client, _ in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            let answers = try await inference.modelStreamInfer(
                requestProducer: { writer in
                    // Request 7 raises; it shares batches with the others, which must not fail with it.
                    for n in 0..<20 {
                        var request = Self.request([Float(n), 0, 0, n == 7 ? -1 : 0])
                        request.id = n == 7 ? "bad" : "\(n)"
                        try await writer.write(request)
                    }
                },
                onResponse: { response in
                    var seen: [String: String] = [:]
                    for try await message in response.messages { seen[message.inferResponse.id] = message.errorMessage }
                    return seen
                })
            #expect(answers.count == 20)
            #expect(answers["bad"]?.contains("negative input") == true)
            #expect(answers.filter { $0.value.isEmpty }.count == 19)
        }
    }

    @Test func healthService() async throws {
        try await withServer { client, _ in
            let health = Grpc_Health_V1_Health.Client(wrapping: client)
            #expect(try await health.check(.with { $0.service = "" }).status == .serving)
            #expect(try await health.check(.with { $0.service = "typed" }).status == .serving)
            #expect(try await health.check(.with { $0.service = "inference.GRPCInferenceService" }).status == .serving)
            let error = await #expect(throws: RPCError.self) { try await health.check(.with { $0.service = "nope" }) }
            #expect(error?.code == .notFound)
            let first = try await health.watch(.with { $0.service = "echo" }) { response in
                for try await message in response.messages { return message.status }
                return .unknown
            }
            #expect(first == .serving)
        }
    }
}
