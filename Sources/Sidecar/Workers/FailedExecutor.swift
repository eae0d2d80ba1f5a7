/// Stands in for a model whose reload failed: no workers, every request refused with the reason.
///
/// A reload unloads the model first; if loading it again fails (the handler no longer imports, the
/// environment does not build), the model must not vanish from status with its reason — operators
/// look for it there — so the host lists it with this executor, FAILED, until the next reload or
/// an unload.
final class FailedExecutor: Executor {
    let failure: SidecarError?

    init(failure: SidecarError) { self.failure = failure }

    func run() async {}
    func waitUntilReady() async throws { if let failure { throw failure } }
    func stop() {}
    var workers: [WorkerStatus] { [] }
    func resize(to workers: Int, timeout: Duration) async throws { if let failure { throw failure } }
    var autoscaler: AutoscalerStatus? { nil }
    func disableAutoscaling(reason: String) {}
    var isAvailable: Bool { false }
}
