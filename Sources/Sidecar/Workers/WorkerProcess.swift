import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Metrics
import SidecarWorkerProtocol
import Subprocess
import Synchronization

#if canImport(System)
import System
#else
import SystemPackage
#endif

/// One life of one Python worker process: spawn it in its own process group, connect its session,
/// feed it batches from the batcher until it exits or is told to stop, then make sure the whole
/// process group is gone. The supervisor starts a new `WorkerProcess` for the next life.
final class WorkerProcess: Sendable {
    let spec: WorkerSpec
    let index: Int
    let generation: Int
    let batcher: Batcher
    let window: InFlightWindow
    let logger: Logger
    /// This process's part of its slot's status (the pool adds the slot's history).
    let status: LockedBox<WorkerStatus>
    let onReady: @Sendable () -> Void
    let onRecycle: @Sendable (String) -> Void
    /// The health checks and `recycle:` limits, applied at each ping.
    let health: WorkerHealth

    let session = Mutex(Session())
    /// Finished by ``retire()``: the dispatcher stops taking batches.
    let retirement: AsyncStream<Void>
    private let retirementSink: AsyncStream<Void>.Continuation
    /// Time the handler spent on each batch (`sidecar_compute_seconds`).
    let computeTime: Metrics.Timer

    init(
        spec: WorkerSpec, index: Int, generation: Int, batcher: Batcher,
        logger: Logger, onReady: @escaping @Sendable () -> Void, onRecycle: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.spec = spec
        self.index = index
        self.generation = generation
        self.batcher = batcher
        self.window = InFlightWindow(capacity: spec.window)
        self.status = LockedBox(WorkerStatus(index: index))
        var logger = logger
        logger[metadataKey: "worker"] = "\(index)"
        self.logger = logger
        self.onReady = onReady
        self.onRecycle = onRecycle
        let recycle = spec.recycle
        let itemLimit = recycle.maxRequests > 0 ? recycle.maxRequests + Int.random(in: 0...recycle.maxRequestsJitter) : nil
        self.health = WorkerHealth(timeouts: spec.timeouts, recycle: recycle, itemLimit: itemLimit)
        (retirement, retirementSink) = AsyncStream.makeStream()
        self.computeTime = Metrics.Timer(label: "sidecar_compute_seconds", dimensions: [("model", spec.model)])
    }

    var socketPath: String { spec.socketDirectory.appendingPathComponent("w\(index)-\(generation).sock").path }

    /// Asks the worker to leave: it takes no new batch, finishes those in flight (up to
    /// `shutdown_grace_s`), then gets Shutdown, SIGTERM, SIGKILL. A worker still loading has
    /// nothing to finish and is killed at once.
    func retire() {
        let (ready, pid, exited) = session.withLock { session -> (Bool, pid_t, Bool) in
            session.retired = true
            return (session.isReady, session.pid, session.hasExited)
        }
        retirementSink.finish()
        if !ready, !exited { kill(group: pid, SIGKILL) }
    }

    /// Signals the worker's process group, unless the process is known to be gone. `deliberate`:
    /// the supervisor decided to end the worker (as opposed to sweeping up after it ended).
    func kill(group pid: pid_t, _ signal: Int32, deliberate: Bool = true) {
        let exited = session.withLock { session -> Bool in
            if deliberate { session.killedBySupervisor = true }
            return session.hasExited
        }
        guard pid > 0, !exited else { return }
        _ = Glibc.kill(-pid, signal)
    }

    /// Runs the process to its end. Batches it had in flight are left in `window` for the caller to
    /// hand back to the batcher.
    func run() async -> WorkerExit {
        try? FileManager.default.removeItem(atPath: socketPath)
        let stderrTail = LineTail(limit: 40)
        var options = PlatformOptions()
        options.processGroupID = 0  // its own group, so that killing the group also kills its children
        let arguments = [
            "-m", "sidecar_worker", "--socket", socketPath, "--model-dir", spec.modelDirectory.path,
            "--handler", spec.handler, "--model-name", spec.model, "--worker-index", "\(index)",
            "--config-json", spec.handlerConfig.json, "--max-message-bytes", "\(spec.maxMessageBytes)",
        ]
        let termination: String
        var killedBySignal9 = false
        do {
            let result = try await Subprocess.run(
                .path(FilePath(spec.python.path)),
                arguments: Arguments(arguments),
                environment: .inherit.updating(["PYTHONUNBUFFERED": "1"]),
                workingDirectory: FilePath(spec.modelDirectory.path),
                platformOptions: options,
                input: .inputWriter,  // held open: the worker exits when it reads EOF (we died)
                output: .sequence,
                error: .sequence
            ) { execution in
                let pid = execution.processIdentifier.value
                session.withLock { $0.pid = pid }
                status.withLock {
                    $0.pid = pid
                    $0.state = .starting
                }
                logger.debug("worker process started", metadata: ["pid": "\(pid)"])
                await supervise(execution: execution, pid: pid, stderrTail: stderrTail)
                try? await execution.standardInputWriter.finish()
            }
            termination = Self.describe(result.terminationStatus)
            if case .signaled(SIGKILL) = result.terminationStatus { killedBySignal9 = true }
        } catch {
            termination = "could not be started: \(error)"
        }
        session.withLock { $0.advance(to: .exited) }
        try? FileManager.default.removeItem(atPath: socketPath)
        let end = session.withLock { $0 }
        let reason = end.endReason.map { "\($0); the process \(termination)" } ?? "the process \(termination)"
        status.withLock {
            $0.state = .stopped
            $0.pid = nil
            $0.inFlight = 0
            $0.rssBytes = nil
        }
        return WorkerExit(
            becameReady: end.becameReady, loadError: end.loadError, reason: reason, stderrTail: stderrTail.lines,
            retired: end.retired || end.drained, killedFromOutside: killedBySignal9 && !end.killedBySupervisor)
    }

    private enum Finished { case processGone, sessionEnded, killed }

    private func supervise(
        execution: Execution<CustomWriteInput, SequenceOutput, SequenceOutput>, pid: pid_t, stderrTail: LineTail
    ) async {
        let logger = self.logger
        await withTaskGroup(of: Finished.self) { group in
            group.addTask {
                // Both pipes reach EOF when the process (and any child holding them) is gone.
                await withTaskGroup(of: Void.self) { pumps in
                    pumps.addTask {
                        do {
                            for try await line in execution.standardOutput.strings() {
                                logger.info("\(line)", metadata: ["stream": "stdout"])
                            }
                        } catch {}
                    }
                    pumps.addTask {
                        do {
                            for try await line in execution.standardError.strings() {
                                logger.info("\(line)", metadata: ["stream": "stderr"])
                                stderrTail.append(line)
                            }
                        } catch {}
                    }
                }
                return .processGone
            }
            group.addTask {
                await self.runSession(pid: pid)
                return .sessionEnded
            }
            let first = await group.next()
            if first == .sessionEnded {
                // Told to stop: the worker got Shutdown in-band and normally exits at once; if not,
                // SIGTERM, and SIGKILL after that. A broken stream gets a moment, then SIGKILL.
                let stopping = session.withLock { $0.isDraining }
                group.addTask {
                    if stopping {
                        try? await Task.sleep(for: .seconds(5))
                        if !Task.isCancelled {
                            logger.warning("worker did not exit after Shutdown; sending SIGTERM", metadata: ["pid": "\(pid)"])
                            self.kill(group: pid, SIGTERM)
                        }
                        try? await Task.sleep(for: .seconds(2))
                    } else {
                        try? await Task.sleep(for: .seconds(1))
                    }
                    return .killed
                }
                if await group.next() == .killed {
                    self.kill(group: pid, SIGKILL)
                }
            }
            // Whatever is left of the group (children the handler spawned) goes too.
            self.kill(group: pid, SIGKILL, deliberate: false)
            group.cancelAll()
        }
    }

    private static func describe(_ status: TerminationStatus) -> String {
        switch status {
        case .exited(let code): return code == 0 ? "exited normally" : "exited with status \(code)"
        case .signaled(let signal): return "was killed by signal \(signal)\(signal == SIGKILL ? " (SIGKILL)" : signal == SIGSEGV ? " (SIGSEGV)" : "")"
        }
    }
}
