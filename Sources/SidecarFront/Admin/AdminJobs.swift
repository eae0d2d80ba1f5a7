import Foundation
import Hummingbird
import Sidecar
import Synchronization

/// Scoring jobs started through the admin API (`POST /admin/v1/jobs`), run by the host in the
/// background (so none outlives it) through the model's batcher, beside its other traffic.
final class ScoringJobs: Sendable {
    struct Entry: Sendable {
        var id: String
        var model: String
        var job: ScoringJob
    }
    private let entries = Mutex<[String: Entry]>([:])

    func start(_ request: AdminJobRequest, host: ModelHost) throws -> Entry {
        let model: Model
        do { model = try host.resolve(request.model) } catch { throw FrontError.from(error) }
        var spec = ScoringJobSpec(input: request.input, output: request.output)
        spec.errors = request.errors
        spec.format = try request.format.map { text in
            guard let format = ScoringJobFormat(rawValue: text) else { throw FrontError(.invalidArgument, "format must be jsonl or csv, got '\(text.prefix(20))'") }
            return format
        }
        spec.resume = request.resume ?? false
        spec.spanLines = request.span_lines ?? spec.spanLines
        spec.idField = request.id_field ?? spec.idField
        let busy = entries.withLock { $0.values.contains { $0.job.spec.output == spec.output && $0.job.progress.state == .running } }
        if busy { throw FrontError(.conflict, "a job writing \(spec.output) is running") }
        let job: ScoringJob
        do { job = try ScoringJob(spec: spec) } catch let error as SidecarError { throw FrontError(error.code == .conflict ? .conflict : .invalidArgument, error.message) }
        let entry = Entry(id: UUID().uuidString.lowercased().prefix(12).description, model: model.name, job: job)
        entries.withLock { $0[entry.id] = entry }
        let logger = host.logger
        host.runInBackground {
            do {
                let done = try await job.run(on: model)
                logger.info("scoring job \(entry.id) done: \(done.ok) ok, \(done.failed) failed; output \(job.spec.output)")
            } catch {
                logger.warning("scoring job \(entry.id) stopped: \(job.progress.error ?? "\(error)")")
            }
        }
        return entry
    }

    func entry(_ id: String) throws -> Entry {
        guard let entry = entries.withLock({ $0[id] }) else { throw FrontError(.notFound, "no scoring job '\(id.prefix(40))'") }
        return entry
    }

    var all: [Entry] { entries.withLock { Array($0.values) }.sorted { $0.id < $1.id } }
}

/// `POST /admin/v1/jobs`.
struct AdminJobRequest: Decodable {
    var model: String
    var input: String
    var output: String
    var errors: String?
    var format: String?
    var resume: Bool?
    var span_lines: Int?
    var id_field: String?

    static func decode(_ body: Data) throws -> AdminJobRequest {
        let request: AdminJobRequest = try decodeAdminBody(body, what: "job")
        for (name, path) in [("input", request.input), ("output", request.output), ("errors", request.errors ?? "/")] {
            guard path.hasPrefix("/"), !path.contains("\0") else { throw FrontError(.invalidArgument, "\(name) must be an absolute path on the server, got '\(path.prefix(200))'") }
        }
        if let span = request.span_lines, !ScoringJobSpec.spanLinesRange.contains(span) {
            throw FrontError(.invalidArgument, "span_lines must be from 1 to 1000000, got \(span)")
        }
        return request
    }
}

/// A job as the admin API shows it.
struct AdminJobStatus: Encodable {
    var id: String
    var model: String
    var input: String
    var output: String
    var errors: String
    var state: String
    @ExplicitNull var lines: Int?
    var done: Int
    var ok: Int
    var failed: Int
    var resumed: Int
    var items_per_second: Double
    @ExplicitNull var eta_s: Double?
    @ExplicitNull var error: String?
}

extension AdminJobStatus {
    init(_ entry: ScoringJobs.Entry) {
        let p = entry.job.progress
        let spec = entry.job.spec
        self.init(
            id: entry.id, model: entry.model, input: spec.input, output: spec.output, errors: spec.errorsPath, state: p.state.rawValue, lines: p.lines,
            done: p.done, ok: p.ok, failed: p.failed, resumed: p.resumed, items_per_second: (p.itemsPerSecond * 10).rounded() / 10, eta_s: p.eta,
            error: p.error)
    }
}
