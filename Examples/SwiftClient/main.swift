// A Swift app calling Sidecar over gRPC across every pod of a Kubernetes headless Service:
// grpc-swift-2 resolves the name to every pod's address (its DNS resolver, getaddrinfo) and
// balances calls over them round robin, so a pod that goes away is dropped and the rest take its
// share. Through a plain ClusterIP Service every call of one connection would land on one pod.
//
//   swift run sidecar-client-example dns:sidecar-headless.models.svc.cluster.local:8001 echo 100
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SidecarOIPProtocol

@main
struct SidecarClientExample {
    static func main() async throws {
        let arguments = CommandLine.arguments.dropFirst()
        guard arguments.count >= 2, let target = arguments.first.flatMap(parse) else {
            print("usage: sidecar-client-example dns:HOST:PORT|HOST:PORT MODEL [REQUESTS]")
            exit(2)
        }
        let model = arguments[arguments.startIndex + 1]
        let requests = arguments.count > 2 ? Int(arguments[arguments.startIndex + 2]) ?? 10 : 10

        let transport = try HTTP2ClientTransport.Posix(
            target: target,
            transportSecurity: .plaintext,
            // Round robin over every address the name resolves to (the default, pick-first, would use one).
            serviceConfig: ServiceConfig(loadBalancingConfig: [.roundRobin]))
        try await withGRPCClient(transport: transport) { client in
            let inference = Inference_GRPCInferenceService.Client(wrapping: client)
            var answered = 0
            var failed = 0
            for index in 0..<requests {
                let request = Inference_ModelInferRequest.with {
                    $0.modelName = model
                    $0.id = "swift-\(index)"
                    $0.inputs = [.with { $0.name = "x"; $0.datatype = "FP32"; $0.shape = [1]; $0.contents = .with { $0.fp32Contents = [Float(index)] } }]
                }
                do {
                    _ = try await inference.modelInfer(request)
                    answered += 1
                } catch {
                    failed += 1
                    print("request \(index) failed: \(error)")
                }
            }
            print("answered \(answered), failed \(failed)")
        }
    }

    static func parse(_ text: String) -> ResolvableTargets.DNS? {
        let spec = text.hasPrefix("dns:") ? String(text.dropFirst(4)) : text
        guard let colon = spec.lastIndex(of: ":"), let port = Int(spec[spec.index(after: colon)...]) else { return nil }
        return .dns(host: String(spec[..<colon]), port: port)
    }
}
