/// Arithmetic on numbers that come from outside the process — request shapes, binary sizes, length
/// prefixes, tar headers, configuration values, timeouts. Swift traps on integer overflow and on a
/// floating-point value converted to an integer type it does not fit; in a server, a trap on a
/// client's number is a denial of service for every model and every request in flight. Every such
/// number goes through here and overflow becomes `nil`, which the caller turns into a clear refusal.
public enum Checked {
    /// `a * b`, or nil when it overflows.
    @inlinable
    public static func multiply(_ a: Int, _ b: Int) -> Int? {
        let (value, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? nil : value
    }

    /// `a + b`, or nil when it overflows.
    @inlinable
    public static func add(_ a: Int, _ b: Int) -> Int? {
        let (value, overflow) = a.addingReportingOverflow(b)
        return overflow ? nil : value
    }

    /// The product of `factors` (1 for none), or nil when any step overflows. A zero factor does not
    /// excuse an overflow before it: `[2^62, 4, 0]` is refused, as the reading order would overflow.
    @inlinable
    public static func product(_ factors: some Sequence<Int>) -> Int? {
        var result = 1
        for factor in factors {
            guard let next = multiply(result, factor) else { return nil }
            result = next
        }
        return result
    }
}

extension Duration {
    /// The longest timeout taken from outside (a request, a header, a file). Longer ones are clamped to
    /// it: a year is "no deadline" for any request, and it keeps instants far from the clock's range.
    public static let longestTimeout: Duration = .seconds(365 * 24 * 3600)

    /// `amount` of `unit` (e.g. 1_000 for milliseconds, counted in microseconds) clamped to
    /// ``longestTimeout``; nil when `amount` is negative, NaN or infinite.
    public static func clampedTimeout(_ amount: Double, microsecondsPerUnit: Double) -> Duration? {
        guard amount.isFinite, amount >= 0 else { return nil }
        let limit = Double(longestTimeout.components.seconds) * 1_000_000
        let microseconds = min(amount * microsecondsPerUnit, limit)
        return .microseconds(Int64(microseconds))  // in range: at most the limit, which fits
    }

    /// `amount` whole `unit`s (an integer from a header or a protobuf field), clamped to
    /// ``longestTimeout``; nil when negative.
    public static func clampedTimeout(_ amount: Int64, microsecondsPerUnit: Int64) -> Duration? {
        guard amount >= 0 else { return nil }
        let limit = longestTimeout.components.seconds * 1_000_000
        let (microseconds, overflow) = amount.multipliedReportingOverflow(by: microsecondsPerUnit)
        return .microseconds(overflow ? limit : min(microseconds, limit))
    }

    /// Nanoseconds, clamped: `grpc-timeout`'s finest unit.
    public static func clampedTimeout(nanoseconds amount: Int64) -> Duration? {
        guard amount >= 0 else { return nil }
        return min(.nanoseconds(amount), longestTimeout)
    }
}
