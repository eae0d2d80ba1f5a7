// Coverage-guided fuzz targets for every decoder of data from outside the process (libFuzzer, with
// address sanitizer). One binary holds them all; `SIDECAR_FUZZ_TARGET` picks the decoder, each with
// its own corpus under Fuzz/corpus/<target>. Build and run with `scripts/fuzz.sh [TARGET] [SECONDS]`.
//
// A decoder may refuse any input with its own error; what it must never do is trap (overflow, an
// index out of range, a forced unwrap), allocate what an input claims instead of what it holds, or
// break the invariants checked below. A broken invariant is a `fatalError`, which libFuzzer reports
// as a crash with the input that caused it.

import Dispatch
import Foundation
import GRPCCore
import SwiftProtobuf
@testable import Sidecar
@testable import SidecarFront
import SidecarOIPProtocol
import SidecarWorkerProtocol

enum FuzzTarget: String, CaseIterable {
    /// The OIP v2 HTTP body: JSON tensors, or a JSON header plus binary tensors.
    case oipHTTP = "oip-http"
    /// The HTTP and gRPC headers that carry numbers: Inference-Header-Content-Length,
    /// Sidecar-Timeout-Ms, grpc-timeout.
    case headers = "headers"
    /// KServe v1 `{"instances": [...]}`.
    case kserveV1 = "kserve-v1"
    /// gRPC `ModelInferRequest` (protobuf bytes) → tensors.
    case grpcInfer = "grpc-infer"
    /// The BYTES tensor layout (4-byte little-endian length prefixes).
    case bytesTensor = "bytes"
    /// A worker's `BatchResult` → one result per item, and the JSON array splitter behind it.
    case workerResult = "worker-result"
    /// The decompressed tar stream of an uploaded bundle: the tar reader and every entry check.
    case bundleTar = "bundle-tar"
    /// A model's `sidecar.yaml`.
    case modelConfig = "model-config"
    /// The server's `--config` file.
    case serverConfig = "server-config"
    /// Admin API bodies: load and scale requests.
    case adminBody = "admin-body"
    /// A scoring job's input file: JSON Lines or CSV records, and the id field found in them.
    case jobRecords = "job-records"

    static let selected: FuzzTarget = {
        let name = ProcessInfo.processInfo.environment["SIDECAR_FUZZ_TARGET"] ?? ""
        guard let target = FuzzTarget(rawValue: name) else {
            let names = FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")
            FileHandle.standardError.write(Data("set SIDECAR_FUZZ_TARGET to one of: \(names)\n".utf8))
            exit(2)
        }
        return target
    }()

    func run(_ data: Data) {
        switch self {
        case .oipHTTP: fuzzOIPHTTP(data)
        case .headers: fuzzHeaders(data)
        case .kserveV1: fuzzKServeV1(data)
        case .grpcInfer: fuzzGRPCInfer(data)
        case .bytesTensor: fuzzBytesTensor(data)
        case .workerResult: fuzzWorkerResult(data)
        case .bundleTar: fuzzBundleTar(data)
        case .modelConfig: fuzzModelConfig(data)
        case .serverConfig: fuzzServerConfig(data)
        case .adminBody: fuzzAdminBody(data)
        case .jobRecords: fuzzJobRecords(data)
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func sidecarFuzzOne(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    FuzzTarget.selected.run(Data(bytes: start, count: count))
    return 0
}

// MARK: - Invariants

func violated(_ what: String) -> Never {
    fatalError("fuzz invariant violated: \(what)")
}

/// Only the errors a front answers with (400/404/413/...) may come out of a request decoder.
func expectRequestError(_ error: any Error, _ decoder: String) {
    switch error {
    case is FrontError, is SidecarError, is DecodingError: return
    default: violated("\(decoder) threw \(type(of: error)): \(error)")
    }
}

/// Every tensor that passed `validate()` holds exactly what its shape says.
func checkValidated(_ tensor: Tensor) {
    guard let count = tensor.elementCount else { violated("a validated tensor has no element count: \(tensor.shape)") }
    if let bytes = tensor.expectedByteCount {
        guard bytes == tensor.data.count else { violated("validated \(tensor.shape) needs \(bytes) bytes, holds \(tensor.data.count)") }
    } else {
        guard let ranges = try? Tensor.bytesElementRanges(tensor.data), ranges.count == count else {
            violated("validated BYTES tensor \(tensor.shape) does not hold \(count) elements")
        }
    }
}

// MARK: - Targets

/// Layout: one flag byte (bit 0: the binary extension is on), a 4-byte little-endian signed header
/// length (any value: negative, past the body), then the body.
func fuzzOIPHTTP(_ data: Data) {
    guard data.count >= 5 else { return }
    let bytes = [UInt8](data)
    let binary = bytes[0] & 1 == 1
    let raw = Int32(bitPattern: UInt32(bytes[1]) | UInt32(bytes[2]) << 8 | UInt32(bytes[3]) << 16 | UInt32(bytes[4]) << 24)
    let body = Data(bytes[5...])
    let decoded: HTTPInference.Decoded
    do {
        decoded = try HTTPInference.decode(body, headerLength: binary ? Int(raw) : nil)
    } catch {
        expectRequestError(error, "HTTPInference.decode")
        return
    }
    var valid = true
    for tensor in decoded.inputs {
        do { try tensor.validate(); checkValidated(tensor) } catch {
            expectRequestError(error, "Tensor.validate")
            valid = false
        }
    }
    // An echo model answers with the inputs: the encoder must take whatever validated.
    guard valid else { return }
    for binaryOut in [false, true] {
        var request = decoded
        request.requested = nil
        request.binaryByDefault = binaryOut
        do {
            let (encoded, headerLength) = try HTTPInference.encode(decoded.inputs, for: request, model: "m")
            let json = headerLength.map { encoded.prefix($0) } ?? encoded
            guard (try? JSONSerialization.jsonObject(with: json)) != nil else { violated("the response header is not JSON") }
        } catch {
            expectRequestError(error, "HTTPInference.encode")
        }
    }
}

/// Three header values separated by newlines: Inference-Header-Content-Length, Sidecar-Timeout-Ms,
/// grpc-timeout; plus the OIP `timeout` parameter from the first as a JSON number.
func fuzzHeaders(_ data: Data) {
    let text = String(decoding: data, as: UTF8.self)
    let parts = text.split(separator: "\n", maxSplits: 3, omittingEmptySubsequences: false).map(String.init)
    func part(_ i: Int) -> String? { i < parts.count ? parts[i] : nil }
    do { _ = try HTTPInference.headerLength(part(0)) } catch { expectRequestError(error, "headerLength") }
    do {
        if let timeout = try Deadlines.timeout(header: part(1)) {
            guard timeout >= .zero, timeout <= .longestTimeout else { violated("Sidecar-Timeout-Ms gave \(timeout)") }
            _ = Deadlines.deadline(from: .now, timeout)
        }
    } catch { expectRequestError(error, "Sidecar-Timeout-Ms") }
    if let value = part(2) {
        var metadata = Metadata()
        metadata.addString(value, forKey: "grpc-timeout")
        if let timeout = Deadlines.timeout(grpc: metadata) {
            guard timeout >= .zero, timeout <= .longestTimeout else { violated("grpc-timeout gave \(timeout)") }
            _ = Deadlines.deadline(from: .now, timeout)
        }
    }
    if let value = part(0), let element = try? JSONDecoder().decode(JSONElement.self, from: Data(value.utf8)) {
        do {
            if let timeout = try Deadlines.timeout(microseconds: element) {
                guard timeout >= .zero, timeout <= .longestTimeout else { violated("parameters.timeout gave \(timeout)") }
            }
        } catch { expectRequestError(error, "parameters.timeout") }
    }
}

func fuzzKServeV1(_ data: Data) {
    let items: [JSONValue]
    do { items = try KServeV1.items(from: data) } catch {
        expectRequestError(error, "KServeV1.items")
        return
    }
    // An echo model answers each instance with itself: the response must be JSON with one
    // prediction per instance.
    guard let body = try? KServeV1.response(items.map { .success($0) }),
          let object = try? JSONSerialization.jsonObject(with: body, options: [.fragmentsAllowed]) as? [String: Any],
          let predictions = object["predictions"] as? [Any], predictions.count == items.count
    else { violated("KServe v1 echo response is not one prediction per instance") }
}

func fuzzGRPCInfer(_ data: Data) {
    // The early refusal's look at the wire format must agree with the decoder on every message
    // the decoder accepts (nil only means "let the decoder say").
    let peek = InferRequestPeek(Array(data))
    guard let request = try? Inference_ModelInferRequest(serializedBytes: data) else { return }
    if let peek, peek != InferRequestPeek(model: request.modelName, version: request.modelVersion, id: request.id) {
        violated("the peek read \(peek), the decoder \(request.modelName) \(request.modelVersion) \(request.id)")
    }
    _ = GRPCTensors.payloadBytes(of: request)
    do { _ = try Deadlines.timeout(request.parameters["timeout"]) } catch { expectRequestError(error, "gRPC timeout parameter") }
    let inputs: [Tensor]
    do { inputs = try GRPCTensors.inputs(of: request) } catch {
        expectRequestError(error, "GRPCTensors.inputs")
        return
    }
    for tensor in inputs {
        do { try tensor.validate(); checkValidated(tensor) } catch { expectRequestError(error, "Tensor.validate") }
    }
}

/// The first 8 bytes are a claimed element count (any Int64); the rest is BYTES data.
func fuzzBytesTensor(_ data: Data) {
    guard data.count >= 8 else { return }
    let claimed = data.prefix(8).withUnsafeBytes { Int(Int64(littleEndian: $0.loadUnaligned(as: Int64.self))) }
    let payload = Data(data.dropFirst(8))
    if let ranges = try? Tensor.bytesElementRanges(payload) {
        var end = payload.startIndex
        for range in ranges {
            guard range.lowerBound == end + 4, range.upperBound <= payload.endIndex else { violated("BYTES ranges do not tile the data") }
            end = range.upperBound
        }
        guard end == payload.endIndex else { violated("BYTES ranges stop before the end") }
        guard let again = try? Tensor.bytesData(ranges.map { payload[$0] }), again == payload else { violated("BYTES re-encoding differs") }
        let exact = Tensor(name: "x", datatype: .bytes, shape: [ranges.count], data: payload)
        do { try exact.validate() } catch { violated("BYTES data of \(ranges.count) elements refused for its own count: \(error)") }
    }
    let tensor = Tensor(name: "x", datatype: .bytes, shape: [claimed], data: payload)
    do { try tensor.validate(); checkValidated(tensor) } catch { expectRequestError(error, "Tensor.validate") }
    let wide = Tensor(name: "x", datatype: .bytes, shape: [claimed, claimed], data: payload)
    do { try wide.validate(); checkValidated(wide) } catch { expectRequestError(error, "Tensor.validate") }
}

/// First byte: the batch's item count (bits 0-6) and whether it is a tensor batch (bit 7); the rest
/// is a `BatchResult` as a worker would send it, and also raw worker JSON for the splitter.
func fuzzWorkerResult(_ data: Data) {
    guard let first = data.first else { return }
    let count = Int(first & 0x7f)
    let tensors = first & 0x80 != 0
    let rest = Data(data.dropFirst())
    if let result = try? Sidecar_Worker_V1_BatchResult(serializedBytes: rest) {
        let results = BatchResultDecoder.results(of: result, count: count, tensors: tensors)
        guard results.count == count else { violated("a batch of \(count) got \(results.count) results") }
        _ = BatchResultDecoder.handlerRaised(result)
    }
    if let ranges = try? JSONArraySplitter.split(rest, expectedCount: count) {
        for range in ranges {
            guard range.lowerBound >= rest.startIndex, range.upperBound <= rest.endIndex, !range.isEmpty else {
                violated("splitter range \(range) outside the data")
            }
        }
        // On valid JSON (what a worker sends) the splitter must agree with a real parser. Raw control
        // bytes are never valid JSON, but Foundation's parser accepts some inputs with NUL bytes
        // (`[` NUL ` ` NUL `]` parses as [], found by this target), so such inputs are not compared.
        let strict = !rest.contains(where: { $0 < 0x20 && $0 != 0x09 && $0 != 0x0A && $0 != 0x0D })
        if strict, let array = try? JSONSerialization.jsonObject(with: rest, options: [.fragmentsAllowed]) as? [Any] {
            guard array.count == ranges.count else { violated("splitter found \(ranges.count) elements, the parser \(array.count)") }
            for range in ranges where (try? JSONSerialization.jsonObject(with: rest[range], options: [.fragmentsAllowed])) == nil {
                violated("splitter element \(range) is not JSON")
            }
        }
    }
}

/// The first byte picks the piece size the stream arrives in; the rest is the decompressed tar.
func fuzzBundleTar(_ data: Data) {
    guard let first = data.first else { return }
    let tar = [UInt8](data.dropFirst())
    let chunk = [1, 7, 512, 4096][Int(first & 3)]
    let limits = BundleArchive.Limits(maxCompressedBytes: 1 << 20, maxUnpackedBytes: 1 << 20, maxEntries: 256)
    let outcome = blocking { try await BundleArchive.check(tar: tar, limits: limits, chunkSize: chunk) }
    if case .failure(let error) = outcome {
        guard let error = error as? SidecarError, error.code == .invalidInput else { violated("bundle check threw \(error)") }
    }
}

func fuzzModelConfig(_ data: Data) {
    let text = String(decoding: data, as: UTF8.self)
    do {
        let config = try ModelConfiguration.parse(yaml: text, file: "sidecar.yaml", defaultName: "m")
        guard ModelConfiguration.workerRange.contains(config.workers), ModelConfiguration.isValidName(config.name) else {
            violated("accepted a configuration out of range: workers \(config.workers), name '\(config.name)'")
        }
    } catch {
        guard error is SidecarError else { violated("sidecar.yaml parse threw \(type(of: error)): \(error)") }
    }
}

func fuzzServerConfig(_ data: Data) {
    let text = String(decoding: data, as: UTF8.self)
    do { _ = try ServerConfigurationFile.read(yaml: text, path: "/nonexistent/sidecar-server.yaml") } catch {
        guard error is SidecarError else { violated("server config threw \(type(of: error)): \(error)") }
    }
}

/// First byte: which body (even: load, odd: scale); the rest is the JSON body.
func fuzzAdminBody(_ data: Data) {
    guard let first = data.first else { return }
    let body = Data(data.dropFirst())
    do {
        if first & 1 == 0 {
            let load = try AdminLoadRequest.decode(body)
            if let workers = load.workers, !ModelConfiguration.workerRange.contains(workers) { violated("load accepted workers \(workers)") }
        } else {
            let scale = try AdminScaleRequest.decode(body)
            guard scale.timeout > .zero, scale.timeout <= .longestTimeout else { violated("scale timeout \(scale.timeout)") }
        }
    } catch {
        expectRequestError(error, "admin body")
    }
}

/// First byte: the format (even: JSON Lines, odd: CSV); the rest is the file. Every CSV record read
/// as an item must be a JSON object with one key per header column; line numbers only grow; an id
/// found in a JSON line that parses as an object with an "id" is that value.
func fuzzJobRecords(_ data: Data) {
    guard let first = data.first else { return }
    let format: ScoringJobFormat = first & 1 == 0 ? .jsonl : .csv
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-fuzz-job-\(getpid())").path
    guard FileManager.default.createFile(atPath: path, contents: Data(data.dropFirst())) else { violated("cannot write \(path)") }
    let reader: JobRecordReader
    do { reader = try JobRecordReader(path: path, format: format, idField: "id") } catch {
        guard error is SidecarError else { violated("the reader threw \(type(of: error)): \(error)") }
        return
    }
    var lastLine = 0
    var columns: Int?
    while true {
        let record: JobRecord?
        do { record = try reader.next() } catch { violated("next() threw \(error)") }
        guard let record else { break }
        guard record.line > lastLine else { violated("line \(record.line) after line \(lastLine)") }
        lastLine = record.line
        guard case .success(let item) = record.item else { continue }
        switch format {
        case .csv:
            guard let object = (try? JSONSerialization.jsonObject(with: item, options: [.fragmentsAllowed])) as? [String: Any] else {
                violated("a CSV record became invalid JSON: \(String(decoding: item, as: UTF8.self))")
            }
            if let columns, object.count > columns { violated("a CSV record has \(object.count) keys, the header \(columns)") }
            columns = columns ?? object.count
        case .jsonl:
            guard let object = (try? JSONSerialization.jsonObject(with: item, options: [.fragmentsAllowed])) as? [String: Any],
                let id = object["id"], object.keys.filter({ $0 == "id" }).count == 1
            else { continue }
            guard let raw = record.id, let found = try? JSONSerialization.jsonObject(with: raw, options: [.fragmentsAllowed]) else {
                violated("the id of \(String(decoding: item, as: UTF8.self)) was not found")
            }
            guard "\(found)" == "\(id)" else { violated("the id found is \(found), the object's is \(id)") }
        }
    }
}

// MARK: - Support

/// Where an async result lands for the synchronous caller; the semaphore orders the accesses.
final class ResultSlot<T: Sendable>: @unchecked Sendable {
    var result: Result<T, any Error>?
}

/// Runs async code from libFuzzer's synchronous callback.
func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> Result<T, any Error> {
    let slot = ResultSlot<T>()
    let done = DispatchSemaphore(value: 0)
    Task {
        do { slot.result = .success(try await body()) } catch { slot.result = .failure(error) }
        done.signal()
    }
    done.wait()
    return slot.result ?? .failure(CancellationError())
}
