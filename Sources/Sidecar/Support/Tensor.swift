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

    /// The most dimensions a request's tensor may have: numpy's limit (NPY_MAXDIMS, 64 since
    /// numpy 2), so that anything the front accepts the worker can build.
    public static let maxRank = 64

    /// The number of elements the shape describes; nil when a dimension is negative or the product
    /// overflows `Int` (a shape from a client can claim anything).
    public var elementCount: Int? {
        guard shape.allSatisfy({ $0 >= 0 }) else { return nil }
        return Checked.product(shape)
    }

    /// The bytes the shape needs at the datatype's element size; nil for BYTES, a negative
    /// dimension, or a size that overflows `Int`.
    public var expectedByteCount: Int? {
        guard let size = datatype.elementSize, let count = elementCount else { return nil }
        return Checked.multiply(count, size)
    }

    /// The shape for a message: at most 16 dimensions written out, so that an error about a shape of
    /// thousands of dimensions stays a line (a gRPC status message travels in a size-limited trailer).
    public static func describe(_ shape: [Int]) -> String {
        guard shape.count > 16 else { return "\(shape)" }
        return "[" + shape.prefix(16).map(String.init).joined(separator: ", ") + ", … (\(shape.count) dimensions)]"
    }

    /// Checks that the data holds exactly the elements the shape describes, and that the worker can
    /// build the array (numpy's rank and size limits). Only arithmetic on the shape and one pass over
    /// the data: nothing is allocated for what a shape claims.
    public func validate() throws {
        let shown = Self.describe(shape)
        let name = self.name.count > 200 ? String(self.name.prefix(200)) + "…" : self.name
        guard shape.count <= Self.maxRank else {
            throw SidecarError(.invalidInput, "input '\(name)': shape \(shown) has \(shape.count) dimensions; at most \(Self.maxRank) are allowed")
        }
        if let bad = shape.first(where: { $0 < 0 }) {
            throw SidecarError(.invalidInput, "input '\(name)': shape \(shown) has a negative dimension (\(bad)); a request's shape must be concrete")
        }
        // numpy refuses an array whose non-zero dimensions multiply past Int64 even when another
        // dimension is 0 (so it holds nothing): so does the front, with a 400 rather than the worker's 500.
        let arrayItemSize = datatype.elementSize ?? 8  // a BYTES tensor becomes an array of object pointers
        guard let nominal = Checked.product(shape.filter { $0 != 0 }), Checked.multiply(nominal, arrayItemSize) != nil else {
            throw SidecarError(
                .invalidInput,
                "input '\(name)': shape \(shown) claims more elements than any request can hold (the product of its dimensions overflows); the data has \(data.count) bytes")
        }
        let count = shape.contains(0) ? 0 : nominal
        if let size = datatype.elementSize {
            let needed = count * size  // cannot overflow: checked above with the same factors
            guard data.count == needed else {
                throw SidecarError(
                    .invalidInput,
                    "input '\(name)': shape \(shown) of \(datatype.rawValue) needs \(needed) bytes (\(count) × \(size)), the data has \(data.count)")
            }
        } else {
            // Every BYTES element takes at least its 4-byte prefix: a count the data cannot hold is
            // refused before the data is walked.
            guard count <= data.count / 4 else {
                throw SidecarError(
                    .invalidInput,
                    "input '\(name)': shape \(shown) claims \(count) BYTES elements, but \(data.count) bytes hold at most \(data.count / 4) (each has a 4-byte length prefix)")
            }
            let elements = try Self.bytesElementCount(data, name: name)
            guard elements == count else {
                throw SidecarError(.invalidInput, "input '\(name)': shape \(shown) has \(count) elements, the BYTES data has \(elements)")
            }
        }
    }

    /// The elements of a BYTES tensor's length-prefixed data, as ranges of `data`.
    public static func bytesElementRanges(_ data: Data) throws -> [Range<Int>] {
        try bytesElements(data, name: "")
    }

    static func bytesElements(_ data: Data, name: String) throws -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        try walkBytesElements(data, name: name) { ranges.append($0) }
        return ranges
    }

    /// How many elements BYTES data holds, checked to the end, without collecting them.
    static func bytesElementCount(_ data: Data, name: String) throws -> Int {
        var count = 0
        try walkBytesElements(data, name: name) { _ in count += 1 }
        return count
    }

    /// Walks the length-prefixed layout; a prefix that claims more than what remains is an error
    /// (prefixes are unsigned 32-bit, so `length` cannot be negative and `i + length` cannot
    /// overflow once it is known to be within the data).
    private static func walkBytesElements(_ data: Data, name: String, _ visit: (Range<Int>) -> Void) throws {
        var i = data.startIndex
        while i < data.endIndex {
            guard data.endIndex - i >= 4 else {
                throw SidecarError(.invalidInput, "input '\(name)': BYTES data ends inside a 4-byte length prefix (\(data.endIndex - i) bytes left at offset \(i - data.startIndex))")
            }
            let length = Int(UInt32(data[i]) | UInt32(data[i + 1]) << 8 | UInt32(data[i + 2]) << 16 | UInt32(data[i + 3]) << 24)
            i += 4
            guard data.endIndex - i >= length else {
                throw SidecarError(.invalidInput, "input '\(name)': a BYTES element claims \(length) bytes, only \(data.endIndex - i) remain")
            }
            visit(i..<(i + length))
            i += length
        }
    }

    /// Encodes elements in the BYTES layout. An element longer than its 32-bit length prefix can
    /// say (4 GiB) is refused rather than truncated.
    public static func bytesData(_ elements: [Data]) throws -> Data {
        var total: Int? = 0
        for element in elements {
            guard element.count <= Int(UInt32.max) else {
                throw SidecarError(.invalidInput, "a BYTES element of \(element.count) bytes is longer than its 4-byte length prefix can describe (4 GiB)")
            }
            total = total.flatMap { Checked.add($0, 4 + element.count) }
        }
        var data = Data()
        if let total { data.reserveCapacity(total) }
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

    public func accepts(_ shape: [Int]) -> Bool {
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
