import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SidecarWorkerProtocol
import Synchronization

/// The transport's floor on the Swift side: a bare grpc-swift-2 client (no Sidecar code) streaming
/// `Batch`es over one `Session` to a worker.proto server on a Unix socket, a fixed number in
/// flight, and printing the CPU time per batch of this process and of the server process.
/// `scripts/bench-hop.sh` runs it against `scripts/bench/hop_floor_server.py` and prints Sidecar's
/// own per-batch CPU beside it.
@main
struct HopFloor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sidecar-hop-floor",
        abstract: "CPU per batch of a bare grpc-swift-2 client and a bare worker.proto server: the worker hop's floor.")

    @Option(help: "The server's Unix socket.")
    var socket: String

    @Option(help: "The server's pid (for its CPU time).")
    var serverPid: Int32

    @Option(help: "Items per batch, comma-separated.")
    var items: String = "1,1024"

    @Option(help: "The item, as JSON.")
    var item: String = #"{"x": 1.5, "id": 7}"#

    @Option(help: "Batches in flight at once (Sidecar's window is 2).")
    var inFlight: Int = 2

    @Option(help: "Seconds measured per batch size (after a warm-up).")
    var seconds: Double = 5

    @Option(help: "A label for the printed lines.")
    var label: String = "floor"

    func run() async throws {
        let transport = try HTTP2ClientTransport.Posix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
        try await withGRPCClient(transport: transport) { client in
            let worker = Sidecar_Worker_V1_Worker.Client(wrapping: client)
            for size in items.split(separator: ",").compactMap({ Int($0) }) {
                let batchItems = Array(repeating: Data(item.utf8), count: size)
                _ = try await stream(worker, items: batchItems, for: .milliseconds(500))  // warm-up
                let (server0, client0) = (cpuSeconds(of: serverPid), cpuSeconds(of: getpid()))
                let start = ContinuousClock.now
                let batches = try await stream(worker, items: batchItems, for: .milliseconds(Int(seconds * 1000)))
                let elapsed = (ContinuousClock.now - start) / .seconds(1)
                let (server1, client1) = (cpuSeconds(of: serverPid), cpuSeconds(of: getpid()))
                print(String(
                    format: "%@ items/batch=%d in-flight=%d batches/s=%.0f cpu/batch: swift=%.0fus python=%.0fus",
                    label, size, inFlight, Double(batches) / elapsed, (client1 - client0) * 1e6 / Double(batches), (server1 - server0) * 1e6 / Double(batches)))
            }
            client.beginGracefulShutdown()
        }
    }

    /// Streams batches on one Session for `duration`, `inFlight` at a time; returns how many were answered.
    func stream(_ worker: Sidecar_Worker_V1_Worker.Client<HTTP2ClientTransport.Posix>, items: [Data], for duration: Duration) async throws -> Int {
        let (credits, credit) = AsyncStream.makeStream(of: Void.self)
        for _ in 0..<inFlight { credit.yield() }
        let deadline = ContinuousClock.now + duration
        let sent = Atomic(0)
        return try await worker.session(
            requestProducer: { writer in
                var id: UInt64 = 0
                for await _ in credits {
                    guard ContinuousClock.now < deadline else { break }
                    id += 1
                    try await writer.write(.with { $0.batch = .with { $0.id = id; $0.items = items } })
                    sent.add(1, ordering: .relaxed)
                }
            },
            onResponse: { response in
                var answered = 0
                for try await message in response.messages {
                    guard case .result = message.kind else { continue }
                    answered += 1
                    if ContinuousClock.now >= deadline, answered >= sent.load(ordering: .relaxed) { break }
                    credit.yield()
                }
                credit.finish()
                return answered
            })
    }

    /// User + system CPU seconds of `pid` (from /proc).
    func cpuSeconds(of pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}
