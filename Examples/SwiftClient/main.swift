// A Swift app calling Sidecar over gRPC across every pod of a Kubernetes headless Service: the
// name resolves to every pod's address, and calls are balanced over them round robin, so a pod that
// goes away is dropped and the rest take its share. Through a plain ClusterIP Service every call of
// one connection would land on one pod.
//
// grpc-swift-nio-transport's own DNS resolver (2.9) returns all of a name's addresses as *one*
// endpoint, which round robin treats as one backend (it connects to the first that answers), so this
// app registers a resolver that makes each address an endpoint of its own (`HeadlessService`).
//
//   swift run sidecar-client-example dns:sidecar-headless.models.svc.cluster.local:8001 echo 100
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SidecarOIPProtocol

#if canImport(Glibc)
import Glibc
#endif

@main
struct SidecarClientExample {
    static func main() async throws {
        let arguments = CommandLine.arguments.dropFirst()
        guard arguments.count >= 2, let target = arguments.first.flatMap(HeadlessService.parse) else {
            print("usage: sidecar-client-example dns:HOST:PORT|HOST:PORT MODEL [REQUESTS]")
            exit(2)
        }
        let model = arguments[arguments.startIndex + 1]
        let requests = arguments.count > 2 ? Int(arguments[arguments.startIndex + 2]) ?? 10 : 10

        var resolvers = NameResolverRegistry.defaults
        resolvers.registerFactory(HeadlessService.Resolvers())
        let transport = try HTTP2ClientTransport.Posix(
            target: target,
            transportSecurity: .plaintext,
            resolverRegistry: resolvers,
            // Round robin over every endpoint (the default, pick-first, would use one).
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
}

/// A name that resolves to several equivalent servers (a headless Service): each address is an
/// endpoint of its own, so round robin spreads calls over all of them. Resolved again whenever the
/// channel asks (pull), so pods that come and go are followed.
struct HeadlessService: ResolvableTarget, Sendable {
    var host: String
    var port: Int

    static func parse(_ text: String) -> HeadlessService? {
        let spec = text.hasPrefix("dns:") ? String(text.dropFirst(4)) : text
        guard let colon = spec.lastIndex(of: ":"), let port = Int(spec[spec.index(after: colon)...]) else { return nil }
        return HeadlessService(host: String(spec[..<colon]), port: port)
    }

    struct Resolvers: NameResolverFactory, Sendable {
        func resolver(for target: HeadlessService) -> NameResolver {
            NameResolver(names: RPCAsyncSequence(wrapping: Names(target: target)), updateMode: .pull, authority: "\(target.host):\(target.port)")
        }
    }

    struct Names: AsyncSequence, Sendable {
        typealias Element = NameResolutionResult
        let target: HeadlessService

        struct AsyncIterator: AsyncIteratorProtocol {
            let target: HeadlessService
            func next() async throws -> NameResolutionResult? {
                let endpoints = target.addresses().map { Endpoint(addresses: [$0]) }
                guard !endpoints.isEmpty else {
                    throw RPCError(code: .unavailable, message: "\(target.host) resolves to no address")
                }
                return NameResolutionResult(endpoints: endpoints, serviceConfig: nil)
            }
        }

        func makeAsyncIterator() -> AsyncIterator { AsyncIterator(target: target) }
    }

    /// Every address the name resolves to (getaddrinfo: /etc/hosts and DNS, as the system resolves).
    func addresses() -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return [] }
        defer { freeaddrinfo(first) }
        var found: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            if getnameinfo(info.pointee.ai_addr, info.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST) == 0 {
                let text = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                let address: SocketAddress = info.pointee.ai_family == AF_INET6 ? .ipv6(host: text, port: port) : .ipv4(host: text, port: port)
                if !found.contains(address) { found.append(address) }
            }
            cursor = info.pointee.ai_next
        }
        return found
    }
}
