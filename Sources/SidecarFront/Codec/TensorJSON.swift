import Foundation
import Sidecar

/// Converts between a tensor's raw little-endian data and the JSON `data` arrays of the Open
/// Inference Protocol's HTTP binding (row-major, flattened or nested).
enum TensorJSON {
    /// Raw data for `datatype` from a JSON `data` value (nested arrays are flattened).
    static func data(from json: JSONElement, datatype: TensorDataType, name: String) throws -> Data {
        var elements: [JSONElement] = []
        flatten(json, into: &elements)
        var data = Data()
        if let size = datatype.elementSize { data.reserveCapacity(elements.count * size) }
        for (index, element) in elements.enumerated() {
            func bad(_ expected: String) -> FrontError {
                FrontError(.invalidArgument, "input '\(name)': data[\(index)] must be \(expected) for \(datatype.rawValue), got \(element.describe)")
            }
            switch datatype {
            case .bytes:
                guard case .string(let text) = element else { throw bad("a string") }
                let utf8 = Data(text.utf8)
                guard let length = UInt32(exactly: utf8.count) else { throw bad("a string shorter than 4 GiB") }
                append(length, to: &data)
                data.append(utf8)
            case .bool:
                guard let value = element.boolValue else { throw bad("true or false") }
                data.append(value ? 1 : 0)
            case .fp16:
                guard let value = element.doubleValue else { throw bad("a number") }
                append(Float16(value).bitPattern, to: &data)
            case .fp32:
                guard let value = element.doubleValue else { throw bad("a number") }
                append(Float(value).bitPattern, to: &data)
            case .fp64:
                guard let value = element.doubleValue else { throw bad("a number") }
                append(value.bitPattern, to: &data)
            default:
                guard try appendInteger(element, datatype, to: &data) else { throw bad("an integer in range") }
            }
        }
        return data
    }

    /// The flattened elements of a tensor's data, as JSON.
    static func json(from tensor: Tensor) -> [JSONElement] {
        let data = tensor.data
        if tensor.datatype == .bytes {
            let ranges = (try? Tensor.bytesElementRanges(data)) ?? []
            return ranges.map { .string(String(decoding: data[$0], as: UTF8.self)) }
        }
        guard let size = tensor.datatype.elementSize else { return [] }
        return data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) -> [JSONElement] in
            let count = raw.count / size
            var values: [JSONElement] = []
            values.reserveCapacity(count)
            func load<T: FixedWidthInteger>(_ offset: Int, _ type: T.Type) -> T { T(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: T.self)) }
            for i in 0..<count {
                let o = i * size
                switch tensor.datatype {
                case .bool: values.append(.bool(raw[o] != 0))
                case .uint8: values.append(.integer(Int64(raw[o])))
                case .int8: values.append(.integer(Int64(Int8(bitPattern: raw[o]))))
                case .uint16: values.append(.integer(Int64(load(o, UInt16.self))))
                case .int16: values.append(.integer(Int64(load(o, Int16.self))))
                case .uint32: values.append(.integer(Int64(load(o, UInt32.self))))
                case .int32: values.append(.integer(Int64(load(o, Int32.self))))
                case .uint64: values.append(.unsigned(load(o, UInt64.self)))
                case .int64: values.append(.integer(load(o, Int64.self)))
                case .fp16: values.append(.number(Double(Float16(bitPattern: load(o, UInt16.self)))))
                case .fp32: values.append(.number(Double(Float(bitPattern: load(o, UInt32.self)))))
                case .fp64: values.append(.number(Double(bitPattern: load(o, UInt64.self))))
                case .bytes: break
                }
            }
            return values
        }
    }

    private static func flatten(_ value: JSONElement, into elements: inout [JSONElement]) {
        if case .array(let array) = value {
            for element in array { flatten(element, into: &elements) }
        } else {
            elements.append(value)
        }
    }

    static func append<T: FixedWidthInteger>(_ value: T, to data: inout Data) {
        withUnsafeBytes(of: value.littleEndian) { data.append(contentsOf: $0) }
    }

    private static func appendInteger(_ element: JSONElement, _ datatype: TensorDataType, to data: inout Data) throws -> Bool {
        func put<T: FixedWidthInteger>(_ type: T.Type) -> Bool {
            let value: T?
            switch element {
            case .integer(let v): value = T(exactly: v)
            case .unsigned(let v): value = T(exactly: v)
            case .number(let v): value = T(exactly: v)
            default: value = nil
            }
            guard let value else { return false }
            append(value, to: &data)
            return true
        }
        switch datatype {
        case .int8: return put(Int8.self)
        case .int16: return put(Int16.self)
        case .int32: return put(Int32.self)
        case .int64: return put(Int64.self)
        case .uint8: return put(UInt8.self)
        case .uint16: return put(UInt16.self)
        case .uint32: return put(UInt32.self)
        case .uint64: return put(UInt64.self)
        default: return false
        }
    }
}
