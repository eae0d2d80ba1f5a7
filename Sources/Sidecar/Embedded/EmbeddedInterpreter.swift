import CPython
import Foundation
import Synchronization

/// The one CPython interpreter of this server process, shared by every embedded model.
///
/// Started on first use, on the environment of the first embedded model, and never finalised
/// (numpy and many C extensions cannot be initialised twice in one process). It runs with
/// `install_signal_handlers = 0`, so SIGTERM and SIGINT stay the server's (they drain it).
///
/// Models share it only when they share the environment (one `sys.prefix`, one set of
/// site-packages) and their handler modules have different top-level names (one `sys.modules`);
/// otherwise ``admit(model:environment:module:)`` refuses them with the fix. Their threads take
/// turns on the GIL.
///
/// A service thread of its own (holding the interpreter's main thread state) pings the GIL, so a
/// handler that holds it forever is seen, and raises `BatchTimeout` in a model thread whose batch
/// ran past its timeout.
final class EmbeddedInterpreter: Sendable {
    static let shared = EmbeddedInterpreter()

    private struct Started: @unchecked Sendable {
        var environment: URL
        var firstModel: String
        var version: String
        var interpreter: OpaquePointer
        var mainThread: UnsafeMutablePointer<PyThreadState>
        var batchTimeout: PythonObject
        var runtime: PythonObject
    }

    private struct Admitted {
        var environment: URL
        var module: String
    }

    private struct State: @unchecked Sendable {
        var started: Started?
        var models: [String: Admitted] = [:]
        var lastPong = ContinuousClock.now
        var pingSent: ContinuousClock.Instant?
    }

    private let state = Mutex(State())
    private let service = DedicatedThread(name: "sidecar-python", spin: DedicatedThread.pythonSpin)

    /// The Python version, once started.
    var version: String? { state.withLock { $0.started?.version } }

    /// When a thread last got the GIL for the service thread's ping, and whether a ping waits for it
    /// now (since when).
    var liveness: (lastPong: ContinuousClock.Instant, waitingSince: ContinuousClock.Instant?) {
        state.withLock { ($0.lastPong, $0.pingSent) }
    }

    // MARK: Admission

    /// Lets `model` use the interpreter, or says why it cannot, with the fix. Pairs with
    /// ``dismiss(model:)`` when the model unloads.
    func admit(model: String, environment: URL, module: String) throws {
        try state.withLock { state in
            if let started = state.started, started.environment.standardizedFileURL != environment.standardizedFileURL {
                throw SidecarError(
                    .invalidConfiguration,
                    "model '\(model)' cannot run embedded: the server's embedded Python interpreter runs the environment of model '\(started.firstModel)' (\(started.environment.path)), and one process has one interpreter; "
                        + "give '\(model)' the same requirements (and python.interpreter) as '\(started.firstModel)', or run it with executor: process")
            }
            for (other, admitted) in state.models where other != model {
                if admitted.environment.standardizedFileURL != environment.standardizedFileURL {
                    throw SidecarError(
                        .invalidConfiguration,
                        "model '\(model)' cannot run embedded beside model '\(other)': their environments differ and one process has one interpreter; "
                            + "give them the same requirements, or run one with executor: process")
                }
                if admitted.module == module {
                    throw SidecarError(
                        .invalidConfiguration,
                        "model '\(model)' cannot run embedded beside model '\(other)': both handlers are a top-level module named '\(module)', and the embedded interpreter has one sys.modules; "
                            + "rename one (e.g. \(model.replacingOccurrences(of: "-", with: "_"))_handler.py and handler: in sidecar.yaml), or run one with executor: process")
                }
            }
            state.models[model] = Admitted(environment: environment, module: module)
        }
    }

    /// The embedded models admitted now, sorted.
    var models: [String] { state.withLock { $0.models.keys.sorted() } }

    func dismiss(model: String) {
        state.withLock { _ = $0.models.removeValue(forKey: model) }
    }

    // MARK: Start

    /// Starts the interpreter on `environment` (once per process; later calls return at once, or
    /// throw if the interpreter failed to start). `faultLog` receives `faulthandler`'s traceback of
    /// a crash.
    func start(environment: PythonEnvironment, model: String, faultLog: URL) async throws {
        if state.withLock({ $0.started != nil }) { return }
        try Self.checkVersion(of: environment)
        let outcome: Result<Started, SidecarError> = await service.run(ifFinished: .failure(SidecarError(.unavailable, "the Python service thread ended"))) {
            if let started = self.state.withLock({ $0.started }) { return .success(started) }
            let outcome = Self.initialize(environment: environment.directory, model: model, faultLog: faultLog)
            if case .success(let started) = outcome { self.state.withLock { $0.started = started } }
            return outcome
        }
        _ = try outcome.get()
    }

    /// The venv must come from the Python this server links (3.11): its C extensions are built for it.
    private static func checkVersion(of environment: PythonEnvironment) throws {
        let config = environment.directory.appendingPathComponent("pyvenv.cfg")
        let text = (try? String(contentsOf: config, encoding: .utf8)) ?? ""
        let version = text.split(separator: "\n").compactMap { line -> String? in
            let parts = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            return parts.count == 2 && (parts[0] == "version" || parts[0] == "version_info") ? parts[1] : nil
        }.first
        let linked = "\(PY_MAJOR_VERSION).\(PY_MINOR_VERSION)"
        guard let version, version == linked || version.hasPrefix(linked + ".") else {
            throw SidecarError(
                .invalidConfiguration,
                "the embedded executor links Python \(linked) (the system libpython), but the model's environment \(environment.directory.path) is Python \(version ?? "unknown"); "
                    + "leave python.interpreter unset (the system python\(linked) is the default) or use executor: process")
        }
    }

    /// Runs on the service thread: `Py_InitializeFromConfig`, then checks that `sys.prefix` is the
    /// venv, imports the runtime and releases the GIL (keeping the main thread state).
    private static func initialize(environment: URL, model: String, faultLog: URL) -> Result<Started, SidecarError> {
        func failed(_ what: String) -> SidecarError {
            SidecarError(.environmentFailed, "the embedded Python interpreter could not start: \(what)")
        }
        var config = PyConfig()
        // Isolated: no PYTHON* variables and no user site-packages, so the server's own environment
        // cannot change what the model imports. `executable` is the venv's python and `home` stays
        // unset, so that the path calculation finds pyvenv.cfg and makes the venv `sys.prefix`.
        PyConfig_InitIsolatedConfig(&config)
        defer { PyConfig_Clear(&config) }
        config.install_signal_handlers = 0
        config.parse_argv = 0
        let executable = environment.appendingPathComponent("bin/python").path
        var status = withUnsafeMutablePointer(to: &config) { pointer in
            PyConfig_SetBytesString(pointer, pointer.pointer(to: \.executable), executable)
        }
        if PyStatus_Exception(status) != 0 { return .failure(failed(String(cString: status.err_msg))) }
        status = withUnsafeMutablePointer(to: &config) { pointer in
            PyConfig_SetBytesString(pointer, pointer.pointer(to: \.program_name), executable)
        }
        if PyStatus_Exception(status) != 0 { return .failure(failed(String(cString: status.err_msg))) }
        status = Py_InitializeFromConfig(&config)
        if PyStatus_Exception(status) != 0 {
            return .failure(failed(status.err_msg.map { String(cString: $0) } ?? "Py_InitializeFromConfig failed"))
        }
        // The GIL is held by this thread now.
        let prefix = PythonCalls.text(PySys_GetObject("prefix")) ?? "?"
        let expected = environment.resolvingSymlinksInPath().path
        guard URL(fileURLWithPath: prefix).resolvingSymlinksInPath().path == expected else {
            _ = PyEval_SaveThread()
            return .failure(failed("sys.prefix is \(prefix), expected the model's environment \(expected) (is pyvenv.cfg there?)"))
        }
        let runtime: PythonObject
        let batchTimeout: PythonObject
        switch PythonCalls.importModule("sidecar_worker.embedded").flatMap({ module in
            PythonCalls.attribute(module, "BatchTimeout").map { (module, $0) }
        }) {
        case .success(let (module, timeout)):
            runtime = module
            batchTimeout = timeout
        case .failure(let error):
            _ = PyEval_SaveThread()
            return .failure(failed("importing the Sidecar runtime (sidecar_worker.embedded) failed: \(error.headline)"))
        }
        // A crash in native code leaves the Python stacks of every thread in the fault log.
        if case .success(let enable) = PythonCalls.attribute(runtime, "enable_fault_log") {
            if case .success(let none) = PythonCalls.call(enable, [PythonCalls.string(faultLog.path)]) { PythonCalls.release(none) }
            PythonCalls.release(enable)
        }
        let version: String
        if case .success(let function) = PythonCalls.attribute(runtime, "python_version"), case .success(let value) = PythonCalls.call(function, []) {
            version = PythonCalls.text(value.pointer) ?? "?"
            PythonCalls.release(value)
            PythonCalls.release(function)
        } else {
            version = "?"
        }
        let interpreter = PyInterpreterState_Get()!
        let mainThread = PyEval_SaveThread()!
        return .success(Started(
            environment: environment, firstModel: model, version: version, interpreter: interpreter, mainThread: mainThread,
            batchTimeout: batchTimeout, runtime: runtime))
    }

    // MARK: Threads

    /// A model thread's own Python thread state; made on, and used only by, that thread.
    struct ThreadState: @unchecked Sendable {
        let state: UnsafeMutablePointer<PyThreadState>
        /// The thread's ident, which `PyThreadState_SetAsyncExc` takes.
        let ident: UInt
    }

    /// Called on a model thread: a thread state for it (the GIL is not held afterwards).
    func makeThreadState() -> ThreadState? {
        guard let interpreter = state.withLock({ $0.started?.interpreter }), let threadState = PyThreadState_New(interpreter) else { return nil }
        PyEval_RestoreThread(threadState)
        let ident = PyThread_get_thread_ident()
        _ = PyEval_SaveThread()
        return ThreadState(state: threadState, ident: ident)
    }

    /// Called on a model thread that ends: frees its thread state.
    func releaseThreadState(_ threadState: ThreadState) {
        PyEval_RestoreThread(threadState.state)
        PyThreadState_Clear(threadState.state)
        PyThreadState_DeleteCurrent()  // releases the GIL
    }

    /// The runtime module `sidecar_worker.embedded` (GIL needed to use it).
    var runtime: PythonObject? { state.withLock { $0.started?.runtime } }

    // MARK: Service: GIL liveness, interrupts

    /// Asks the service thread to take the GIL once (unless it is still waiting from the last ask):
    /// the time it got it is ``liveness``'s `lastPong`.
    func ping() {
        let send = state.withLock { state -> Bool in
            guard state.started != nil, state.pingSent == nil else { return false }
            state.pingSent = .now
            return true
        }
        guard send, let main = state.withLock({ $0.started?.mainThread }) else { return }
        service.submit {
            PyEval_RestoreThread(main)
            _ = PyEval_SaveThread()
            self.state.withLock {
                $0.lastPong = .now
                $0.pingSent = nil
            }
        }
    }

    /// Raises `BatchTimeout` in the thread `ident` if `stillRunning()` (asked with the GIL held,
    /// so the batch cannot end between the check and the raise) says its batch still runs.
    func interrupt(ident: UInt, if stillRunning: @escaping @Sendable () -> Bool) {
        guard let started = state.withLock({ $0.started }) else { return }
        let main = started.mainThread
        let timeout = started.batchTimeout
        service.submit {
            PyEval_RestoreThread(main)
            if stillRunning() { _ = PyThreadState_SetAsyncExc(ident, timeout.pointer) }
            _ = PyEval_SaveThread()
        }
    }
}
