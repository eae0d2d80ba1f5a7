import Foundation
import Sidecar

/// One message's way through the model.
enum InboxWork {
    /// A JSON item, as one instance of KServe v1 or one line of `sidecar predict`.
    case item(JSONValue)
    /// An Open Inference Protocol v2 JSON request.
    case request(HTTPInference.Decoded)
    /// It cannot be served, ever (malformed): set aside with this reason.
    case setAside(String)
}

/// The inbox's message and result formats, the same payloads as the other fronts:
/// - a message has `id` (the caller's request id; the entry id when absent) and either `item`
///   (JSON) or `request` (an OIP v2 JSON inference request);
/// - a result has `id`, `inbox_id`, `model`, `model_version`, `status` (`ok` or `error`), then
///   `prediction` (for an item) or `response` (an OIP v2 JSON response), or `error` and
///   `error_kind`;
/// - a dead letter has `id`, `inbox_id`, `model`, `reason`, `deliveries` and the message's payload.
enum InboxMessageCodec {
    static let payloadFields = ["item", "request"]

    static func requestID(_ message: InboxMessage) -> String {
        message.fields["id"].map { String(decoding: $0, as: UTF8.self) } ?? message.entry
    }

    static func work(_ message: InboxMessage) -> InboxWork {
        if let item = message.fields["item"] {
            // The worker decodes each item on its own; a malformed one fails alone there
            // (invalidInput) and is set aside like any item that fails alone.
            guard !item.isEmpty else { return .setAside("the 'item' field is empty; it must hold one JSON value") }
            return .item(JSONValue(trusted: Data(item)))
        }
        if let request = message.fields["request"] {
            do { return .request(try HTTPInference.decode(Data(request), headerLength: nil)) } catch let error as FrontError {
                return .setAside("the 'request' field is not an Open Inference Protocol request: \(error.message)")
            } catch {
                return .setAside("the 'request' field is not an Open Inference Protocol request: \(error)")
            }
        }
        let fields = message.fields.keys.sorted().joined(separator: ", ")
        return .setAside("the message has neither an 'item' (JSON) nor a 'request' (OIP v2 JSON) field; it has: \(fields.isEmpty ? "none" : fields)")
    }

    static func result(id: String, entry: String, model: String, version: String?, status: String) -> [(String, [UInt8])] {
        var fields: [(String, [UInt8])] = [("id", Array(id.utf8)), ("inbox_id", Array(entry.utf8)), ("model", Array(model.utf8))]
        if let version { fields.append(("model_version", Array(version.utf8))) }
        fields.append(("status", Array(status.utf8)))
        return fields
    }
}
