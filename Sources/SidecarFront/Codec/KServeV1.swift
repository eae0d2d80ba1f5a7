import Foundation
import Sidecar

/// KServe v1's prediction protocol: `{"instances": [...]}` in, `{"predictions": [...]}` out; each
/// instance is one item of the model's batch.
enum KServeV1 {
    /// The items of a request body, each re-encoded as its own JSON value.
    static func items(from body: Data) throws -> [JSONValue] {
        struct Request: Decodable { var instances: [JSONElement] }
        let request: Request
        do { request = try JSONDecoder().decode(Request.self, from: body) } catch { throw FrontError.from(error) }
        let encoder = JSONEncoder()
        return try request.instances.map { JSONValue(trusted: try encoder.encode($0)) }
    }

    /// The response body; the first failed item fails the request (v1 has no per-item errors).
    static func response(_ results: [ItemResult]) throws -> Data {
        var out = Data(#"{"predictions":["#.utf8)
        for (index, result) in results.enumerated() {
            switch result {
            case .success(let value):
                if index > 0 { out.append(UInt8(ascii: ",")) }
                out.append(value.data)
            case .failure(let error):
                throw FrontError(.internalError, "instance \(index): \(error.type): \(error.message)")
            }
        }
        out.append(contentsOf: "]}".utf8)
        return out
    }
}
