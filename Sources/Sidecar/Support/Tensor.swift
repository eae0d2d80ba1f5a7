import Foundation

/// An Open Inference Protocol datatype.
public enum TensorDataType: String, Sendable, CaseIterable, Codable {
    case bool = "BOOL", uint8 = "UINT8", uint16 = "UINT16", uint32 = "UINT32", uint64 = "UINT64"
    case int8 = "INT8", int16 = "INT16", int32 = "INT32", int64 = "INT64"
    case fp16 = "FP16", fp32 = "FP32", fp64 = "FP64", bytes = "BYTES"

    /// Bytes per element; nil for BYTES, whose elements carry their own length.
    public var elementSize: Int? {
        switch self {
        case .bool, .uint8, .int8: return 1
        case .uint16, .int16, .fp16: return 2
        case .uint32, .int32, .fp32: return 4
        case .uint64, .int64, .fp64: return 8
        case .bytes: return nil
        }
    }
}

/// A named tensor: the unit of Open Inference Protocol requests and responses.
///
/// `data` holds the elements row-major and little-endian, exactly as the protocol's
/// `raw_input_contents` does; a BYTES element is a 4-byte little-endian length followed by its bytes.
public struct Tensor: Sendable, Equatable {
    public var name: String
    public var datatype: TensorDataType
    public var shape: [Int]
    public var data: Data

    public init(name: String, datatype: TensorDataType, shape: [Int], data: Data) {
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.data = data
    }

    /// The number of elements the shape describes.
    public var elementCount: Int { shape.reduce(1, *) }

    /// Checks that the data holds exactly the elements the shape describes.
    public func validate() throws {
        if let bad = shape.first(where: { $0 < 0 }) {
            throw SidecarError(.invalidInput, "input '\(name)': shape \(shape) has a negative dimension (\(bad)); a request's shape must be concrete")
        }
        let count = elementCount
        if let size = datatype.elementSize {
            guard data.count == count * size else {
                throw SidecarError(
                    .invalidInput,
                    "input '\(name)': shape \(shape) of \(datatype.rawValue) needs \(count * size) bytes (\(count) × \(size)), the data has \(data.count)")
            }
        } else {
            let elements = try Self.bytesElements(data, name: name)

            guard elements.count == count else {
                throw SidecarError(.invalidInput, "input '\(name)': shape \(shape) has \(count) elements, the BYTES data has \(elements.count)")
            }
        }
    }

    /// The elements of a BYTES tensor's length-prefixed data, as ranges of `data`.
    public static func bytesElementRanges(_ data: Data) throws -> [Range<Int>] {
        try bytesElements(data, name: "")
    }

    static func bytesElements(_ data: Data, name: String) throws -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        var i = data.startIndex
        while i < data.endIndex {
            guard data.endIndex - i >= 4 else {
                throw SidecarError(.invalidInput, "input '\(name)': BYTES data ends inside a 4-byte length prefix")
            }
            let length = Int(UInt32(data[i]) | UInt32(data[i + 1]) << 8 | UInt32(data[i + 2]) << 16 | UInt32(data[i + 3]) << 24)
            i += 4
            guard data.endIndex - i >= length else {
                throw SidecarError(.invalidInput, "input '\(name)': a BYTES element claims \(length) bytes, only \(data.endIndex - i) remain")
            }
            ranges.append(i..<(i + length))
            i += length
        }
        return ranges
    }

    /// Encodes elements in the BYTES layout.
    public static func bytesData(_ elements: [Data]) -> Data {
        var data = Data()
        data.reserveCapacity(elements.reduce(0) { $0 + 4 + $1.count })
        for element in elements {
            withUnsafeBytes(of: UInt32(element.count).littleEndian) { data.append(contentsOf: $0) }
            data.append(element)
        }
        return data
    }
}

/// A declared input or output of a model (`inputs:` / `outputs:` in `sidecar.yaml`). A dimension of
/// -1 matches any size.
public struct TensorSpec: Sendable, Equatable {
    public var name: String
    public var datatype: TensorDataType
    public var shape: [Int]

    public init(name: String, datatype: TensorDataType, shape: [Int]) {
        self.name = name
        self.datatype = datatype
        self.shape = shape
    }

    func accepts(_ shape: [Int]) -> Bool {
        shape.count == self.shape.count && zip(shape, self.shape).allSatisfy { $1 == -1 || $0 == $1 }
    }
}

/// What travels through the batcher for one item: a JSON value, or the tensors of an Open Inference
/// Protocol request. A batch carries one kind only.
enum Payload: Sendable {
    case json(JSONValue)
    case tensors([Tensor])

    var isJSON: Bool {
        if case .json = self { return true }
        return false
    }
}

/// An item's outcome inside the batcher.
typealias PayloadResult = Result<Payload, PredictionError>
