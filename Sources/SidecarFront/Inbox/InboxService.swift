import Logging
import ServiceLifecycle
import Sidecar
import Synchronization

/// The server's inboxes: one ``InboxFront`` per model that has one (the server configuration's
/// `inboxes:`, else the model's own `inbox:`), started once the model is loaded, whether it came
/// at start, from the admin API or from the repository.
///
/// It is the last service of the group, so a graceful shutdown stops the inboxes first: they stop
/// reading, finish what they read and publish it while the models still serve.
final class InboxService: Service, Sendable {
    private let host: ModelHost
    private let configured: [String: InboxConfiguration]
    private let readiness: ServerReadiness
    /// Without a repository, every model `inboxes:` names must be among those loaded at start.
    private let requireConfiguredModels: Bool
    private let logger: Logger
    private let fronts = Mutex<[String: InboxFront]>([:])

    init(host: ModelHost, configured: [String: InboxConfiguration], readiness: ServerReadiness, requireConfiguredModels: Bool, logger: Logger) {
        self.host = host
        self.configured = configured
        self.readiness = readiness
        self.requireConfiguredModels = requireConfiguredModels
        self.logger = logger
    }

    var statuses: [InboxStatus] { fronts.withLock { $0.values.map(\.status) }.sorted { $0.model < $1.model } }

    /// Checks what can be checked before anything is loaded: the broker addresses.
    static func check(_ configured: [String: InboxConfiguration]) throws {
        for (model, settings) in configured {
            if case .failure(let error) = RedisAddress.parse(settings.broker) {
                throw SidecarError(.invalidConfiguration, "inboxes.\(model).broker: \(error.message)")
            }
        }
    }

    func run() async throws {
        try Self.check(configured)
        var checked = !requireConfiguredModels
        var unreadable: Set<String> = []
        try await withThrowingDiscardingTaskGroup { group in
            while !Task.isShuttingDownGracefully, !Task.isCancelled {
                if !checked, readiness.hasLoaded {
                    checked = true
                    for name in configured.keys.sorted() where host.model(named: name) == nil {
                        throw SidecarError(
                            .invalidConfiguration,
                            "inboxes.\(name): no model named '\(name)' is loaded; the models are: \(host.modelNames.joined(separator: ", "))")
                    }
                }
                for model in host.loadedModels where !unreadable.contains(model.name) && fronts.withLock({ $0[model.name] == nil }) {
                    guard let settings = configured[model.name] ?? model.configuration.inbox else { continue }
                    guard case .success(let address) = RedisAddress.parse(settings.broker) else {
                        logger.error("inbox of model '\(model.name)': '\(settings.broker)' is not a redis:// URL; the inbox is not read")
                        unreadable.insert(model.name)
                        continue
                    }
                    let broker = RedisStreamsBroker(
                        address: address, stream: settings.stream, group: settings.group, consumer: settings.consumerName,
                        outbox: settings.outbox, deadLetters: settings.deadLetterStream)
                    let front = InboxFront(model: model.name, settings: settings, broker: broker, host: host, logger: logger)
                    fronts.withLock { $0[model.name] = front }
                    group.addTask { await front.run() }
                }
                try? await Task.sleep(for: .milliseconds(250))
            }
        }
    }
}
