import Foundation

/// One JSON value, held as its UTF-8 encoding: an item sent to a model, or a prediction it returned.
///
/// Items stay encoded on their way through Sidecar; the worker decodes a whole batch in one call.
///
/// ```swift
/// let item = try JSONValue(json: #"{"sepal_length": 5.1}"#)
/// let prediction = try await model.predict(item)
/// let label: String = try prediction.decode(String.self)
/// ```
public struct JSONValue: Sendable, Hashable, CustomStringConvertible {
    /// The UTF-8 JSON text. A prediction's `data` may be a slice of the buffer its whole batch came
    /// back in (its `startIndex` need not be 0); use it through collection APIs, or `Data(value.data)`
    /// for a compact copy.
    public let data: Data

    /// Parses `json` and keeps it if it is one valid JSON value (objects, arrays, strings, numbers,
    /// `true`, `false`, `null`).
    public init(json: some StringProtocol) throws {
        try self.init(validating: Data(json.utf8))
    }

    /// Keeps `data` if it is one valid UTF-8 JSON value.
    public init(validating data: Data) throws {
        do {
            _ = try JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])
        } catch {
            throw JSONValueError(text: String(decoding: data.prefix(200), as: UTF8.self), reason: "\(error)")
        }
        self.data = data
    }

    /// Encodes `value` with `JSONEncoder`.
    public init(encoding value: some Encodable) throws {
        self.data = try JSONEncoder().encode(value)
    }

    /// Wraps bytes already known to hold one JSON value, produced by a JSON encoder or a worker.
    /// Nothing is checked: passing anything else breaks the batch it travels in.
    public init(trusted data: Data) {
        self.data = data
    }

    /// Decodes the value with `JSONDecoder`.
    public func decode<T: Decodable>(_ type: T.Type = T.self) throws -> T {
        try JSONDecoder().decode(type, from: data)
    }

    /// The JSON text.
    public var json: String { String(decoding: data, as: UTF8.self) }

    public var description: String { json }
}

/// A text that is not one valid JSON value.
public struct JSONValueError: Error, CustomStringConvertible, Sendable {
    public var text: String
    public var reason: String
    public var description: String { "not valid JSON (\(reason)): \(text)" }
}
