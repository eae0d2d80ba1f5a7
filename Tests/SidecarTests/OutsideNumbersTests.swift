import Foundation
import Testing
@testable import Sidecar

/// Numbers from outside the process — shapes, length prefixes, tar headers, configuration values —
/// that used to trap the server (an overflow is SIGILL in Swift: every model and request dies).
/// Each case here crashed the test process before the fix; now it is a clear refusal.
@Suite struct OutsideNumbersTests {
    @Test func shapeWhoseElementCountOverflowsIsRefused() {
        let huge = Tensor(name: "x", datatype: .fp32, shape: [99_999_999_999, 99_999_999_999], data: Data(count: 8))
        #expect(huge.elementCount == nil)
        let error = #expect(throws: SidecarError.self) { try huge.validate() }
        #expect(error?.code == .invalidInput)
        #expect(error?.message.contains("claims more elements than any request can hold") == true)

        // The element count fits, the byte count does not.
        let wide = Tensor(name: "x", datatype: .fp64, shape: [1 << 61], data: Data(count: 8))
        #expect(wide.elementCount == 1 << 61)
        #expect(wide.expectedByteCount == nil)
        #expect(throws: SidecarError.self) { try wide.validate() }

        // An overflow before a zero dimension is still an overflow.
        #expect(Tensor(name: "x", datatype: .fp32, shape: [Int.max, 2, 0], data: Data()).elementCount == nil)
        #expect(Tensor(name: "x", datatype: .fp32, shape: [0, Int.max], data: Data()).elementCount == 0)
        #expect(Tensor(name: "x", datatype: .fp32, shape: [-1, -4], data: Data(count: 16)).elementCount == nil)
    }

    /// What numpy refuses, the front refuses first (a 400, not the worker's 500): found by the live
    /// generator (Tests/e2e/test_pathological.py).
    @Test func shapesNumpyCannotBuildAreRefused() throws {
        let empty = Tensor(name: "x", datatype: .int8, shape: [0, Int.max, 4], data: Data())
        #expect(empty.elementCount == 0)
        let error = #expect(throws: SidecarError.self) { try empty.validate() }
        #expect(error?.message.contains("overflows") == true)
        try Tensor(name: "x", datatype: .int8, shape: [0, 1 << 40, 4], data: Data()).validate()
        #expect(throws: SidecarError.self) { try Tensor(name: "x", datatype: .bytes, shape: [0, 1 << 61], data: Data()).validate() }

        let deep = Tensor(name: "x", datatype: .int8, shape: Array(repeating: 1, count: 65), data: Data([7]))
        let rank = #expect(throws: SidecarError.self) { try deep.validate() }
        #expect(rank?.message.contains("65 dimensions; at most 64") == true)
        try Tensor(name: "x", datatype: .int8, shape: Array(repeating: 1, count: 64), data: Data([7])).validate()
    }

    @Test func longShapesAreShortInMessages() {
        let shape = Array(repeating: Int.max, count: 1000)
        let error = #expect(throws: SidecarError.self) { try Tensor(name: "x", datatype: .fp32, shape: shape, data: Data(count: 4)).validate() }
        #expect((error?.message.count ?? .max) < 600)
        #expect(Tensor.describe([1, 2]) == "[1, 2]")
        #expect(Tensor.describe(Array(repeating: 3, count: 20)).hasSuffix("… (20 dimensions)]"))
    }

    @Test func bytesCountBeyondWhatTheDataHoldsIsRefusedBeforeWalkingIt() throws {
        let data = try Tensor.bytesData([Data("a".utf8)])
        let error = #expect(throws: SidecarError.self) {
            try Tensor(name: "s", datatype: .bytes, shape: [1 << 40], data: data).validate()
        }
        #expect(error?.message.contains("hold at most 1") == true)
        // A length prefix of 0xFFFFFFFF past the end.
        #expect(throws: SidecarError.self) {
            try Tensor(name: "s", datatype: .bytes, shape: [1], data: Data([0xFF, 0xFF, 0xFF, 0xFF, 65])).validate()
        }
    }

    @Test func checkedArithmetic() {
        #expect(Checked.multiply(Int.max, 2) == nil)
        #expect(Checked.add(Int.max, 1) == nil)
        #expect(Checked.product([3, 4, 5]) == 60)
        #expect(Checked.product([Int]()) == 1)
        #expect(Duration.clampedTimeout(1e300, microsecondsPerUnit: 1000) == .longestTimeout)
        #expect(Duration.clampedTimeout(.infinity, microsecondsPerUnit: 1) == nil)
        #expect(Duration.clampedTimeout(-1.0, microsecondsPerUnit: 1) == nil)
        #expect(Duration.clampedTimeout(Int64.max, microsecondsPerUnit: 3_600_000_000) == .longestTimeout)
        #expect(Duration.clampedTimeout(250.0, microsecondsPerUnit: 1000) == .milliseconds(250))
    }

    @Test func configurationDurationsPastAYearAreRefused() {
        for yaml in ["timeouts: {batch_timeout_s: 1e300}", "batching: {max_delay_ms: 1e30}", "restart_policy: {window_s: 99999999999}"] {
            let error = #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: yaml, file: "sidecar.yaml", defaultName: "m") }
            #expect(error?.message.contains("(a year)") == true, "\(yaml): \(error?.message ?? "accepted")")
        }
        #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: "name: ..", file: "sidecar.yaml", defaultName: "m") }
        #expect(throws: SidecarError.self) { try ModelConfiguration.parse(yaml: "workers: 99999999999999999999", file: "sidecar.yaml", defaultName: "m") }
    }

    /// A tar header whose size field (GNU base-256) is close to Int.max: skipping it overflowed.
    @Test func tarEntrySizeNearIntMaxIsRefused() async throws {
        var header = [UInt8](repeating: 0, count: 512)
        for (i, byte) in "big.bin".utf8.enumerated() { header[i] = byte }
        for (i, byte) in "0000644\0".utf8.enumerated() { header[100 + i] = byte }
        header[124] = 0x80  // base-256 size: 0x7F FF FF FF FF FF FF FF F0 in the remaining 11 bytes
        for i in 125..<136 { header[i] = 0xFF }
        header[125] = 0x00
        header[126] = 0x00
        header[127] = 0x7F
        header[156] = UInt8(ascii: "0")
        for (i, byte) in "ustar\0".utf8.enumerated() { header[257 + i] = byte }
        header[263] = UInt8(ascii: "0")
        header[264] = UInt8(ascii: "0")
        for i in 148..<156 { header[i] = 0x20 }
        let sum = header.reduce(0) { $0 + Int($1) }
        for (i, byte) in String(format: "%06o\0 ", sum).utf8.enumerated() { header[148 + i] = byte }
        let tar = header + [UInt8](repeating: 0, count: 1024)
        let error = await #expect(throws: SidecarError.self) { try await BundleArchive.check(tar: tar) }
        #expect(error?.code == .invalidInput)
    }

    /// A pax record whose length is close to Int.max: `position + length` overflowed.
    @Test func paxRecordLengthNearIntMaxIsRefused() throws {
        // A good record first, so the huge length is added to a non-zero position.
        #expect(try BundleArchive.TarReader.paxRecords(Array("9 path=a\n".utf8), offset: 0) == ["path": "a"])
        let content = Array("9 path=a\n9223372036854775807 path=x\n".utf8)
        #expect(throws: (any Error).self) { try BundleArchive.TarReader.paxRecords(content, offset: 0) }
    }
}
