import Foundation
import Logging
import NIOSSL
import Sidecar
import Synchronization

/// The server's certificate and key (`tls:`), as one SSL context per protocol (HTTP/1.1 and
/// gRPC's h2 differ in ALPN). Each new connection takes the current context; ``reload(logger:)``
/// (SIGHUP) swaps in contexts built from the files again, so connections that are open keep
/// theirs and are not dropped.
final class TLSCredentials: Sendable {
    enum Listener {
        case http1, grpc
        var alpn: [String] { self == .grpc ? ["h2"] : ["http/1.1"] }
    }

    /// The contexts of one load of the files.
    private struct Contexts {
        var http1: NIOSSLContext
        var grpc: NIOSSLContext
    }

    let settings: EdgeConfiguration.TLS
    private let contexts: Mutex<Contexts>

    init(_ settings: EdgeConfiguration.TLS) throws {
        self.settings = settings
        contexts = Mutex(try Self.build(settings))
    }

    func context(_ kind: Listener) -> NIOSSLContext { contexts.withLock { kind == .grpc ? $0.grpc : $0.http1 } }

    /// Builds new contexts from the files; on any error keeps the old ones and says why.
    func reload(logger: Logger) {
        do {
            let fresh = try Self.build(settings)
            contexts.withLock { $0 = fresh }
            logger.info("reloaded the TLS certificate from \(settings.certFile)")
        } catch {
            logger.error("kept the old TLS certificate: \(error)")
        }
    }

    private static func build(_ settings: EdgeConfiguration.TLS) throws -> Contexts {
        let chain: [NIOSSLCertificate]
        do { chain = try NIOSSLCertificate.fromPEMFile(settings.certFile) } catch {
            throw SidecarError(.invalidConfiguration, "tls.cert_file \(settings.certFile): cannot read a PEM certificate chain from it (\(error))")
        }
        guard !chain.isEmpty else { throw SidecarError(.invalidConfiguration, "tls.cert_file \(settings.certFile): holds no certificate") }
        let key: NIOSSLPrivateKey
        do { key = try NIOSSLPrivateKey(file: settings.keyFile, format: .pem) } catch {
            throw SidecarError(.invalidConfiguration, "tls.key_file \(settings.keyFile): cannot read a PEM private key from it (\(error))")
        }
        var roots: [NIOSSLCertificate]?
        if let ca = settings.clientCAFile {
            do { roots = try NIOSSLCertificate.fromPEMFile(ca) } catch {
                throw SidecarError(.invalidConfiguration, "tls.client_ca_file \(ca): cannot read PEM certificates from it (\(error))")
            }
        }
        func context(_ kind: Listener) throws -> NIOSSLContext {
            var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            configuration.applicationProtocols = kind.alpn
            if let roots {
                // Clients are not named by host; their certificate must chain to the CA.
                configuration.certificateVerification = .noHostnameVerification
                configuration.trustRoots = .certificates(roots)
            }
            do { return try NIOSSLContext(configuration: configuration) } catch {
                throw SidecarError(.invalidConfiguration, "tls.cert_file \(settings.certFile) and tls.key_file \(settings.keyFile) do not make a TLS context (is the key the certificate's?): \(error)")
            }
        }
        return Contexts(http1: try context(.http1), grpc: try context(.grpc))
    }
}
