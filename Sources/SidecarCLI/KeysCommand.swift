import ArgumentParser
import Crypto
import Foundation

/// `sidecar keys new NAME` and `sidecar keys hash`: API keys for `auth.keys_file`, which holds only
/// their SHA-256.
struct KeysCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keys",
        abstract: "Make API keys for auth.keys_file (which stores only their SHA-256).",
        subcommands: [New.self, Hash.self])

    struct New: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "new",
            abstract: "Make a random key: prints the key (give it to the client) and its keys-file entry.",
            discussion: """
                The key goes to stderr, the YAML entry to stdout, so that the entry can be appended to \
                the keys file (a list of entries, with or without a 'keys:' line above it) while the \
                key is shown once:

                  sidecar keys new alice --models iris --rate 50 --burst 10 >> keys.yaml
                  kill -HUP $(pidof sidecar)      # the server reads the keys file again
                """)

        @Argument(help: "The key's name, shown in metrics and logs (never the key).")
        var name: String

        @Option(name: .long, parsing: .upToNextOption, help: "The models the key may call (default: every model).")
        var models: [String] = []

        @Option(name: .long, help: "Requests per second the key may make.")
        var rate: Double?

        @Option(name: .long, help: "Requests the key may make at once (default: its rate).")
        var burst: Double?

        func validate() throws {
            guard !name.isEmpty, name.count <= 200, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
                throw ValidationError("a key's name is letters, digits, '-', '_' and '.'; got '\(name)'")
            }
            if let rate, !(rate > 0) { throw ValidationError("--rate must be above 0") }
            if burst != nil, rate == nil { throw ValidationError("--burst needs --rate") }
        }

        func run() throws {
            let bytes = SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }
            let key = "sk-" + bytes.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
            StandardStreams.err("API key for '\(name)' (shown once; the keys file holds only its hash):\n\(key)\n")
            var entry = "  - name: \(name)\n    sha256: \(Hash.digest(key))\n"
            if !models.isEmpty { entry += "    models: [\(models.joined(separator: ", "))]\n" }
            if let rate { entry += "    rate: \(rate)\n" }
            if let burst { entry += "    burst: \(burst)\n" }
            StandardStreams.out(entry)
        }
    }

    struct Hash: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "hash",
            abstract: "Print the SHA-256 of a key read from stdin (its first line), for a keys-file entry.",
            discussion: "  printf %s \"$KEY\" | sidecar keys hash")

        func run() throws {
            let input = FileHandle.standardInput.readDataToEndOfFile()
            let key = String(decoding: input, as: UTF8.self).split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
            guard !key.isEmpty else { throw ValidationError("no key on stdin") }
            StandardStreams.line(Self.digest(key))
        }

        static func digest(_ key: String) -> String { SHA256.hash(data: Data(key.utf8)).map { String(format: "%02x", $0) }.joined() }
    }
}
