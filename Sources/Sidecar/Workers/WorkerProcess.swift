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
    private let onReady: @Sendable () -> Void
    private let onRecycle: @Sendable (String) -> Void
    /// The health checks and `recycle:` limits, applied at each ping.
    private let health: WorkerHealth

    /// One life's session, as a phase and the facts about how it ends. Phases only move forward
    /// (starting → serving → draining → exited; a worker may exit from any phase), so a late event
    /// (a Ready after the process died) cannot move the session back.
    private struct Session {
        enum Phase: Int, Comparable {
            /// Spawned, loading the handler.
            case starting
            /// Ready: the dispatcher feeds it.
            case serving
            /// Takes no new batch (the model stopped or the worker was retired); finishes its own.
            case draining
            /// The process is gone: its pid (and group id) may already belong to another process,
            /// so nothing may be sent to it any more.
            case exited

            static func < (a: Phase, b: Phase) -> Bool { a.rawValue < b.rawValue }
        }

        private(set) var phase = Phase.starting
        /// It reached `serving` at some point (it may be draining or gone now).
        private(set) var becameReady = false
        /// It entered `draining` before it exited: it was told to stop, so its exit is no failure.
        private(set) var drained = false
        /// ``retire()`` was called: asked to leave, not a failure, even before it was ready.
        var retired = false
        /// The supervisor killed it (hung, stuck, past the grace): not an outside kill.
        var killedBySupervisor = false
        var pid: pid_t = 0
        var loadError: PredictionError?
        var endReason: String?
        var lastPong = ContinuousClock.now

        var isReady: Bool { becameReady }
        var isDraining: Bool { phase >= .draining }
        var hasExited: Bool { phase == .exited }

        /// Moves forward to `next`; a step back is ignored.
        mutating func advance(to next: Phase) {
            guard next > phase else { return }
            if next == .serving { becameReady = true }
            if next == .draining { drained = true }
            phase = next
        }
    }

    private let session = Mutex(Session())
    /// Finished by ``retire()``: the dispatcher stops taking batches.
    private let retirement: AsyncStream<Void>
    private let retirementSink: AsyncStream<Void>.Continuation
    /// Time the handler spent on each batch (`sidecar_compute_seconds`).
    private let computeTime: Metrics.Timer

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
    private func kill(group pid: pid_t, _ signal: Int32, deliberate: Bool = true) {
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

    // MARK: The session

    private func setEndReason(_ reason: String) {
        session.withLock { if $0.endReason == nil { $0.endReason = reason } }
    }

    private func runSession(pid: pid_t) async {
        let deadline = ContinuousClock.now.advanced(by: spec.timeouts.startup)
        while !FileManager.default.fileExists(atPath: socketPath) {
            if Task.isCancelled { return }
            if ContinuousClock.now > deadline {
                setEndReason("did not open its socket within \(spec.timeouts.startup)")
                return
            }
            try? await Task.sleep(for: .milliseconds(5))
        }
        let (outbox, sink) = AsyncStream.makeStream(of: Sidecar_Worker_V1_SupervisorMessage.self)
        var options = CallOptions.defaults
        options.maxRequestMessageBytes = spec.maxMessageBytes
        options.maxResponseMessageBytes = spec.maxMessageBytes
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
            try await withGRPCClient(transport: transport) { client in
                let worker = Sidecar_Worker_V1_Worker.Client(wrapping: client)
                try await worker.session(
                    options: options,
                    requestProducer: { writer in
                        for await message in outbox { try await writer.write(message) }
                    },
                    onResponse: { response in
                        try await self.serve(response.messages, sink: sink, pid: pid)
                    })
                client.beginGracefulShutdown()
            }
        } catch is CancellationError {
        } catch {
            setEndReason("its session failed: \(error)")
        }
        sink.finish()
    }

    /// Reads the worker's messages; once it is ready, also runs the dispatcher and the pinger.
    private func serve(
        _ messages: RPCAsyncSequence<Sidecar_Worker_V1_WorkerMessage, any Error>,
        sink: AsyncStream<Sidecar_Worker_V1_SupervisorMessage>.Continuation, pid: pid_t
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            let startupDeadline = ContinuousClock.now.advanced(by: spec.timeouts.startup)
            tasks.addTask { await self.ping(sink: sink, pid: pid, startupDeadline: startupDeadline) }
            for try await message in messages {
                switch message.kind {
                case .hello(let hello):
                    status.withLock { $0.pythonVersion = hello.pythonVersion }
                    if hello.protocolVersion != 1 {
                        setEndReason("speaks worker protocol \(hello.protocolVersion), expected 1 (mismatched sidecar_worker runtime)")
                        sink.finish()
                    }
                case .ready(let ready):
                    session.withLock { $0.advance(to: .serving); $0.lastPong = .now }
                    status.withLock { $0.state = .ready }
                    logger.info("worker ready", metadata: ["pid": "\(pid)", "load_seconds": "\(String(format: "%.2f", ready.loadSeconds))"])
                    onReady()
                    tasks.addTask { await self.dispatch(sink: sink) }
                case .loadFailed(let failed):
                    let error = PredictionError(
                        kind: .handlerError, type: failed.error.type, message: failed.error.message,
                        traceback: failed.error.traceback.isEmpty ? nil : failed.error.traceback)
                    session.withLock { $0.loadError = error }
                    setEndReason("the handler failed to load: \(failed.error.type): \(failed.error.message)")
                    sink.finish()
                case .result(let result):
                    guard let job = window.remove(result.id) else {
                        logger.warning("result for unknown batch \(result.id) ignored")
                        continue
                    }
                    status.withLock {
                        $0.batchesServed += 1
                        $0.itemsServed += job.count
                        $0.inFlight -= 1
                        if $0.inFlight == 0, $0.state == .busy { $0.state = .ready }
                    }
                    computeTime.recordNanoseconds(Int64(result.computeSeconds * 1e9))
                    BatchResultDecoder.settle(job, with: result, batcher: batcher, logger: logger)
                case .pong:
                    session.withLock { $0.lastPong = .now }
                case .log(let record):
                    logger.log(level: Self.level(record.level), "\(record.message)", metadata: ["logger": "\(record.logger)"])
                case nil:
                    break
                }
            }
            tasks.cancelAll()
        }
    }

    /// Feeds the worker until the model stops or the worker is retired, then drains it.
    private func dispatch(sink: AsyncStream<Sidecar_Worker_V1_SupervisorMessage>.Continuation) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.feed(sink: sink) }
            group.addTask { for await _ in self.retirement {} }
            // Whichever ends first (the queue closed and drained, or retirement) ends the feeding.
            _ = await group.next()
            group.cancelAll()
        }
        guard !Task.isCancelled else { return }
        session.withLock { $0.advance(to: .draining) }
        // Let the batches in flight finish, up to the grace period, then say goodbye. Batches still
        // running at the end go back to the batcher once the process is gone.
        status.withLock { $0.state = .draining }
        let deadline = ContinuousClock.now.advanced(by: spec.timeouts.shutdownGrace)
        while window.count > 0, ContinuousClock.now < deadline, !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(10))
        }
        sink.yield(.with { $0.shutdown = .init() })
        sink.finish()
        if window.count > 0 {
            // The worker would wait for its batch forever.
            let pid = session.withLock { $0.pid }
            logger.warning("\(window.count) batch(es) still running after shutdown_grace_s (\(spec.timeouts.shutdownGrace)); sending SIGTERM, SIGKILL in 2 s", metadata: ["pid": "\(pid)"])
            kill(group: pid, SIGTERM)
            try? await Task.sleep(for: .seconds(2))
            kill(group: pid, SIGKILL)
        }
    }

    /// Whenever the worker has room, takes what is queued (up to max_batch_size) and sends it.
    private func feed(sink: AsyncStream<Sidecar_Worker_V1_SupervisorMessage>.Continuation) async {
        while !Task.isCancelled {
            await window.waitForRoom()
            if Task.isCancelled { return }
            guard let job = await batcher.nextBatch() else { return }
            if job.runsAlone { await window.waitForRoom(alone: true) }
            guard !Task.isCancelled, window.add(job) else {
                batcher.giveBack(job)
                return
            }
            status.withLock {
                $0.inFlight += 1
                if $0.state == .ready { $0.state = .busy }
            }
            logger.trace("dispatching batch \(job.id) of \(job.count) items")
            sink.yield(.with { $0.batch = BatchEncoder.message(for: job) })
        }
    }

    /// Watches the worker's health at each ping interval: the Python loop (a worker that leaves
    /// pings unanswered past ping_timeout is hung: a deadlock, a GIL held forever, SIGSTOP), progress
    /// (a batch running past batch_timeout), and the `recycle:` limits. A hung or stuck worker's
    /// process group is killed; its batches go back to the batcher.
    private func ping(sink: AsyncStream<Sidecar_Worker_V1_SupervisorMessage>.Continuation, pid: pid_t, startupDeadline: ContinuousClock.Instant) async {
        var nonce: UInt64 = 0
        while !Task.isCancelled {
            try? await Task.sleep(for: spec.timeouts.pingInterval)
            if Task.isCancelled { return }
            let (ready, lastPong, draining) = session.withLock { ($0.isReady, $0.lastPong, $0.isDraining) }
            let rss = ProcessMemory.residentBytes(of: pid)
            let served = status.withLock { status -> Int in
                status.rssBytes = rss
                return status.itemsServed
            }
            let seen = WorkerHealth.Observation(
                now: .now, ready: ready, draining: draining, startupDeadline: startupDeadline, lastPong: lastPong,
                oldestBatchStart: window.oldestStart, residentBytes: rss, itemsServed: served)
            switch health.verdict(seen) {
            case .healthy:
                break
            case .startupTimedOut(let reason):
                setEndReason(reason)
                kill(group: pid, SIGKILL)
                return
            case .unresponsive(let reason):
                declareHung(reason, pid: pid)
                return
            case .recycle(let reason):
                onRecycle(reason)
            }
            nonce += 1
            let n = nonce
            sink.yield(.with { $0.ping = .with { $0.nonce = n } })
        }
    }

    private func declareHung(_ reason: String, pid: pid_t) {
        logger.error("worker \(reason); killing it", metadata: ["pid": "\(pid)"])
        status.withLock { $0.state = .hung }
        setEndReason(reason)
        kill(group: pid, SIGKILL)
    }

    /// A Python logging level as a swift-log level.
    static func level(_ python: Int32) -> Logger.Level {
        switch python {
        case ..<10: return .trace
        case ..<20: return .debug
        case ..<30: return .info
        case ..<40: return .warning
        case ..<50: return .error
        default: return .critical
        }
    }
}
