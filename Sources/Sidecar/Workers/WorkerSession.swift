import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Metrics
import SidecarWorkerProtocol
import Synchronization

/// The gRPC session of one worker process, the Swift end of `worker.proto`'s `Session` stream: wait
/// for the socket, connect, read the worker's messages (Hello, Ready/LoadFailed, BatchResult, Pong,
/// LogRecord), and once it is ready run the dispatcher (batches from the batcher into the in-flight
/// window), the feed (the window into the stream) and the pinger with the health watch. How a
/// session ends is recorded in `Session`, which ``WorkerProcess/run()`` turns into a `WorkerExit`.
extension WorkerProcess {
    /// One life's session, as a phase and the facts about how it ends. Phases only move forward
    /// (starting → serving → draining → exited; a worker may exit from any phase), so a late event
    /// (a Ready after the process died) cannot move the session back.
    struct Session {
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


    private func setEndReason(_ reason: String) {
        session.withLock { if $0.endReason == nil { $0.endReason = reason } }
    }

    func runSession(pid: pid_t) async {
        await withTaskExecutorPreference(WorkerIO.executor) { await runSessionOnWorkerIO(pid: pid) }
    }

    private func runSessionOnWorkerIO(pid: pid_t) async {
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
                target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext, eventLoopGroup: WorkerIO.group)
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
            sink.yield(.with { $0.batch = BatchEncoder.message(for: job, isolate: batcher.retry) })
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
