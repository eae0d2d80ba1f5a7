extension Duration {
    /// The duration in seconds, for rates, metrics and arithmetic with `Double`s.
    public var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }

    /// The duration in milliseconds.
    public var inMilliseconds: Double { inSeconds * 1000 }

    /// Whole nanoseconds, as swift-metrics timers record them.
    public var inNanoseconds: Int64 { components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000 }
}
