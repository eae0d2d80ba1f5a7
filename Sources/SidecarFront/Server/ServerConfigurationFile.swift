import Foundation
import Sidecar
import Yams

/// Reads a server configuration file (`sidecar serve --config FILE`). Unknown keys and bad values
/// are errors naming the file and the key, as for a model's `sidecar.yaml`.
public enum ServerConfigurationFile {
    public static func read(_ path: String) throws -> ServerConfiguration {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw SidecarError(.invalidConfiguration, "\(path): cannot read the server configuration: \(error.localizedDescription)", cause: error)
        }
        return try read(yaml: text, path: path)
    }

    /// Reads the configuration in `text`, naming `path` in errors (relative paths in it are
    /// relative to `path`'s directory).
    public static func read(yaml text: String, path: String) throws -> ServerConfiguration {
        var configuration = ServerConfiguration()
        let root: Yams.Node?
        do { root = try Yams.compose(yaml: text) } catch {
            throw SidecarError(.invalidConfiguration, "\(path): not valid YAML: \(error)", cause: error)
        }
        guard let root else { return configuration }
        guard let mapping = root.mapping else { throw SidecarError(.invalidConfiguration, "\(path): the top level must be a mapping of keys") }
        let keys = [
            "models", "workers", "host", "http_port", "grpc_port", "max_body_bytes", "max_grpc_message_bytes", "cache_dir", "pip_args",
            "admin_host", "admin_port", "admin_token_file", "bundle_dir", "bundle_max_bytes", "repository",
            "inboxes",
        ] + EdgeConfiguration.topKeys
        func fail(_ key: String, _ expected: String) -> SidecarError {
            SidecarError(.invalidConfiguration, "\(path): '\(key)' must be \(expected)")
        }
        func int(_ node: Yams.Node, _ key: String, _ range: ClosedRange<Int>) throws -> Int {
            guard let value = node.int, range.contains(value) else { throw fail(key, "an integer from \(range.lowerBound) to \(range.upperBound)") }
            return value
        }
        func strings(_ node: Yams.Node, _ key: String) throws -> [String] {
            guard case .sequence(let seq) = node else { throw fail(key, "a list of strings") }
            return try seq.map { guard let s = $0.string else { throw fail(key, "a list of strings") }; return s }
        }
        var cacheDir: String?
        var pipArgs: [String] = []
        for (k, v) in mapping {
            guard let key = k.string, keys.contains(key) else {
                throw SidecarError(.invalidConfiguration, "\(path): unknown key '\(k.string ?? "?")'; expected one of: \(keys.joined(separator: ", "))")
            }
            // Relative model paths are relative to the file, so the file works from any directory.
            let base = URL(fileURLWithPath: path).deletingLastPathComponent()
            switch key {
            case "models": configuration.models = try strings(v, key).map { $0.hasPrefix("/") ? $0 : base.appendingPathComponent($0).path }
            case "workers": configuration.workers = try int(v, key, ModelConfiguration.workerRange)
            case "host": guard let s = v.string, !s.isEmpty else { throw fail(key, "an address") }; configuration.host = s
            case "http_port": configuration.httpPort = try int(v, key, ServerConfiguration.Limits.port)
            case "grpc_port": configuration.grpcPort = try int(v, key, ServerConfiguration.Limits.port)
            case "max_body_bytes": configuration.maxBodyBytes = try int(v, key, ServerConfiguration.Limits.bodyBytes)
            case "max_grpc_message_bytes": configuration.maxGRPCMessageBytes = try int(v, key, ServerConfiguration.Limits.grpcMessageBytes)
            case "cache_dir": cacheDir = v.string
            case "admin_host": guard let s = v.string, !s.isEmpty else { throw fail(key, "an address") }; configuration.adminHost = s
            case "admin_port":
                // `admin_port: off` (or null) turns the admin API off.
                if v.null != nil || v.string == "off" { configuration.adminPort = nil } else { configuration.adminPort = try int(v, key, ServerConfiguration.Limits.port) }
            case "admin_token_file":
                guard let file = v.string, !file.isEmpty else { throw fail(key, "a file path") }
                let resolved = file.hasPrefix("/") ? file : base.appendingPathComponent(file).path
                do { configuration.adminToken = try readAdminToken(file: resolved) } catch let error as SidecarError {
                    throw SidecarError(.invalidConfiguration, "\(path): admin_token_file: \(error.message)", cause: error)
                }
            case "bundle_dir":
                guard let dir = v.string, !dir.isEmpty else { throw fail(key, "a directory path") }
                configuration.bundleDirectory = URL(fileURLWithPath: dir.hasPrefix("/") ? dir : base.appendingPathComponent(dir).path)
            case "bundle_max_bytes": configuration.bundleMaxBytes = try int(v, key, ServerConfiguration.Limits.bodyBytes)
            case "repository":
                // `repository: DIR-OR-URL`, or a mapping with `source`, `poll_interval_s`, `keep_versions`.
                if let source = v.string {
                    configuration.repository = ServerConfiguration.resolveRepository(source, base: base)
                } else if let settings = v.mapping {
                    let subkeys = ["source", "poll_interval_s", "keep_versions"]
                    for (sk, sv) in settings {
                        guard let subkey = sk.string, subkeys.contains(subkey) else {
                            throw SidecarError(.invalidConfiguration, "\(path): unknown key 'repository.\(sk.string ?? "?")'; expected one of: \(subkeys.joined(separator: ", "))")
                        }
                        switch subkey {
                        case "source":
                            guard let source = sv.string, !source.isEmpty else { throw fail("repository.source", "a directory or an http(s) URL") }
                            configuration.repository = ServerConfiguration.resolveRepository(source, base: base)
                        case "poll_interval_s":
                            guard let seconds = sv.float, let interval = Duration.clampedTimeout(seconds, microsecondsPerUnit: 1_000_000), seconds >= 0.1 else {
                                throw fail("repository.poll_interval_s", "a number of seconds, at least 0.1")
                            }
                            configuration.repositoryPollInterval = interval
                        default:
                            configuration.keepVersions = try int(sv, "repository.keep_versions", 0...1000)
                        }
                    }
                    guard configuration.repository != nil else { throw fail("repository.source", "set (a directory or an http(s) URL)") }
                } else {
                    throw fail(key, "a directory, an http(s) URL, or a mapping with source, poll_interval_s, keep_versions")
                }
            case "inboxes":
                // `inboxes: {MODEL: {broker, stream, outbox, ...}}`
                guard let byModel = v.mapping else { throw fail(key, "a mapping of model names to inbox settings (broker, stream, outbox, ...)") }
                for (name, settings) in byModel {
                    guard let model = name.string, ModelConfiguration.isValidName(model) else { throw fail(key, "a mapping whose keys are model names") }
                    configuration.inboxes[model] = try ModelConfiguration.parseInbox(settings, key: "inboxes.\(model)", file: path)
                }
            case "pip_args": pipArgs = try strings(v, key)
            default: try configuration.edge.read(key, v, path: path, base: base)
            }
        }
        configuration.hostOptions = HostOptions(
            environment: EnvironmentOptions(cacheDirectory: cacheDir.map { URL(fileURLWithPath: $0) }, pipArgs: pipArgs))
        return configuration
    }
}

/// The admin token held in `file`: its first line, trimmed. An unreadable or empty file is an error,
/// never "no token" (that would silently leave the admin API open).
public func readAdminToken(file: String) throws -> String {
    guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
        throw SidecarError(.invalidConfiguration, "cannot read the admin token file \(file)")
    }
    let token = text.split(whereSeparator: \.isNewline).first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
    guard !token.isEmpty else { throw SidecarError(.invalidConfiguration, "the admin token file \(file) is empty") }
    return token
}
