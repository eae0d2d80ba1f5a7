/// Runs a model's batches. The batcher hands batches to an executor; a pool of Python worker
/// processes (``WorkerPool``) is one implementation, and the embedded CPython interpreter
/// (``EmbeddedExecutor``) is another, so the host drives both the same way.
protocol Executor: Sendable {
    /// Serves batches until the executor is stopped. Runs for the model's whole life.
    func run() async
    /// Returns once the executor can serve, or throws why it cannot (the handler failed to load).
    func waitUntilReady() async throws
    /// Stops taking new batches, lets the ones in flight finish, then stops. ``run()`` returns after.
    func stop()
    /// One status per worker.
    var workers: [WorkerStatus] { get }
    /// Grows or shrinks to `workers` while serving; returns once the change is done.
    func resize(to workers: Int, timeout: Duration) async throws
    /// What the autoscaler is doing, when the model autoscales.
    var autoscaler: AutoscalerStatus? { get }
    /// Turns autoscaling off (an operator set the worker count by hand).
    func disableAutoscaling(reason: String)
    /// Started and neither failed nor stopping: requests will be answered.
    var isAvailable: Bool { get }
    /// Why the executor gave up serving (the crash-loop breaker tripped), or nil.
    var failure: SidecarError? { get }
    /// A line for status pages about how it runs, or nil.
    var note: String? { get }
}

extension Executor {
    var note: String? { nil }
}
