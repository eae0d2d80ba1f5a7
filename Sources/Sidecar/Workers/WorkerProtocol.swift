import Foundation
import Logging
import Metrics
import SidecarWorkerProtocol

// The Swift side of the worker protocol (proto/sidecar/worker/v1/worker.proto): batches to the
// wire, results from it. The session in WorkerProcess.swift only moves these messages.

/// Builds the worker message for a batch.
enum BatchEncoder {
    /// `isolate`: the worker finds the items of a raising batch itself (off for `retry: false`,
    /// where no item may run twice).
    static func message(for job: BatchJob, isolate: Bool) -> Sidecar_Worker_V1_Batch {
        var batch = Sidecar_Worker_V1_Batch()
        batch.id = job.id
        batch.isolate = isolate
        if job.isJSON {
            batch.items = job.jsonItems
        } else {
            batch.tensorItems = job.payloads.map { payload in
                guard case .tensors(let tensors) = payload else { return .init() }
                return .with { $0.tensors = tensors.map(wire) }
            }
        }
        return batch
    }

    static func wire(_ tensor: Tensor) -> Sidecar_Worker_V1_Tensor {
        .with {
            $0.name = tensor.name
            $0.datatype = tensor.datatype.rawValue
            $0.shape = tensor.shape.map(Int64.init)
            $0.data = tensor.data
        }
    }
}

/// Turns a worker's BatchResult into one result per item.
enum BatchResultDecoder {
    /// Answers `job` with the result its executor (a worker process or the embedded interpreter)
    /// sent back, or splits the job when the handler raised for it: one item's exception must not
    /// fail the others (from other callers too). Not with `retry: false`: bisection runs items again.
    ///
    /// A worker isolates a raising batch itself (`Batch.isolate`) and answers each item; what comes
    /// back raised as a whole is a batch the worker could not split (an old runtime), so it is
    /// bisected here as before.
    static func settle(_ job: BatchJob, with result: Sidecar_Worker_V1_BatchResult, batcher: Batcher, logger: Logger) {
        if result.isolationCalls > 0 {
            Counter(label: "sidecar_isolation_calls_total", dimensions: [("model", batcher.modelName)]).increment(by: Int(result.isolationCalls))
        }
        if result.failFast {
            Counter(label: "sidecar_fail_fast_batches_total", dimensions: [("model", batcher.modelName)]).increment()
        }
        // A fail-fast answer is the handler's error for every item, on purpose: not bisected.
        if job.count > 1, batcher.retry, !result.failFast, handlerRaised(result) {
            logger.debug("a batch of \(job.count) raised \(result.batchError.type); splitting it to isolate the item(s)")
            batcher.bisect(job)
        } else {
            job.deliver(results(of: result, count: job.count, tensors: !job.isJSON))
        }
    }

    static func results(of result: Sidecar_Worker_V1_BatchResult, count: Int, tensors: Bool) -> [PayloadResult] {
        if result.hasBatchError {
            let error = result.batchError
            let kind = Self.kind(of: error)
            return Array(
                repeating: .failure(
                    PredictionError(kind: kind, type: error.type, message: error.message, traceback: error.traceback.isEmpty ? nil : error.traceback)),
                count: count)
        }
        var results = [PayloadResult]()
        results.reserveCapacity(count)
        if tensors {
            guard result.tensorOutputs.count == count else { return malformed(count) }
            for item in result.tensorOutputs {
                var outputs: [Tensor] = []
                for wire in item.tensors {
                    guard let datatype = TensorDataType(rawValue: wire.datatype) else { return malformed(count) }
                    outputs.append(Tensor(name: wire.name, datatype: datatype, shape: wire.shape.map { Int($0) }, data: wire.data))
                }
                results.append(.success(.tensors(outputs)))
            }
        } else {
            let outputs = result.outputs
            guard let ranges = try? JSONArraySplitter.split(outputs, expectedCount: count), ranges.count == count else {
                return malformed(count)
            }
            // Each prediction is a slice of the batch's output buffer: no copy, no allocation per item.
            for range in ranges { results.append(.success(.json(JSONValue(trusted: outputs[range])))) }
        }
        for itemError in result.itemErrors where Int(itemError.index) < count {
            let e = itemError.error
            results[Int(itemError.index)] = .failure(
                PredictionError(kind: Self.kind(of: e), type: e.type, message: e.message, traceback: e.traceback.isEmpty ? nil : e.traceback))
        }
        return results
    }

    /// The error's kind as the worker protocol states it: never read from `type`, which for a
    /// handler's exception is whatever the handler named it.
    static func kind(of error: Sidecar_Worker_V1_Error) -> PredictionError.Kind {
        switch error.kind {
        case .wrongResult: return .wrongLength
        case .invalidInput: return .invalidInput
        case .notSerializable: return .invalidItem
        case .handlerRaised, .runtimeFailed, .unspecified, .UNRECOGNIZED: return .handlerError
        }
    }

    /// True when the handler raised for the batch, so bisection can find the item(s) that raise; not
    /// for a wrong result (the handler's contract broken for every batch, not one item's doing) or
    /// a failure of the runtime itself.
    static func handlerRaised(_ result: Sidecar_Worker_V1_BatchResult) -> Bool {
        guard result.hasBatchError else { return false }
        switch result.batchError.kind {
        case .handlerRaised, .unspecified: return true
        case .wrongResult, .runtimeFailed, .invalidInput, .notSerializable, .UNRECOGNIZED: return false
        }
    }

    private static func malformed(_ count: Int) -> [PayloadResult] {
        Array(
            repeating: .failure(
                PredictionError(kind: .handlerError, type: "ProtocolError", message: "the worker answered a batch of \(count) items with malformed outputs")),
            count: count)
    }
}
