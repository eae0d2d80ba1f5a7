/// Any JSON value, decoded strictly: `true` is never the number 1, and integers keep their precision.
enum JSONElement: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case unsigned(UInt64)
    case number(Double)
    case string(String)
    case array([JSONElement])
    case object([String: JSONElement])

    init(from decoder: any Decoder) throws {
        // Probed in order of likelihood in tensor data: every failed probe throws, which is costly.
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Int64.self) { self = .integer(value) }
        else if let value = try? container.decode(Double.self) {
            // Integers above Int64.max decode as Double; keep them exact when they fit UInt64.
            if value >= 0x1p63, let exact = try? container.decode(UInt64.self) { self = .unsigned(exact) } else { self = .number(value) }
        }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(String.self) { self = .string(value) }
        else if let value = try? container.decode([JSONElement].self) { self = .array(value) }
        else { self = .object(try container.decode([String: JSONElement].self)) }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let v): try container.encode(v)
        case .integer(let v): try container.encode(v)
        case .unsigned(let v): try container.encode(v)
        case .number(let v): try container.encode(v)
        case .string(let v): try container.encode(v)
        case .array(let v): try container.encode(v)
        case .object(let v): try container.encode(v)
        }
    }

    var boolValue: Bool? { if case .bool(let v) = self { return v }; return nil }

    var intValue: Int? {
        switch self {
        case .integer(let v): return Int(exactly: v)
        case .unsigned(let v): return Int(exactly: v)
        case .number(let v): return Int(exactly: v)
        default: return nil
        }
    }

    var doubleValue: Double? {
        switch self {
        case .integer(let v): return Double(v)
        case .unsigned(let v): return Double(v)
        case .number(let v): return v
        default: return nil
        }
    }

    var describe: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .integer(let v): return "the number \(v)"
        case .unsigned(let v): return "the number \(v)"
        case .number(let v): return "the number \(v)"
        case .string: return "a string"
        case .array: return "a list"
        case .object: return "an object"
        }
    }
}
