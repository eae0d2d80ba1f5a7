import Foundation
import Logging

/// Turns pip's output into one sentence naming the requirement that failed.
enum PipFailure {
    static func explain(_ lines: [String], model: String, requirements: String) -> SidecarError {
        let output = lines.joined(separator: "\n")
        func requirement(after marker: String) -> String? {
            for line in lines.reversed() {
                if let range = line.range(of: marker) {
                    let rest = line[range.upperBound...].trimmingCharacters(in: .whitespaces)
                    return String(rest.split(separator: " ").first ?? Substring(rest))
                }
            }
            return nil
        }
        let message: String
        if let name = requirement(after: "No matching distribution found for") {
            message = "pip could not install '\(name)' for model '\(model)': no version of it matches on the package index; check its name and version in \(requirements), or the index options (python.pip_args)"
        } else if output.contains("ResolutionImpossible") || output.contains("conflicting dependencies") {
            message = "pip could not install the requirements of model '\(model)': they conflict with each other (or with the worker runtime's grpcio/protobuf/orjson); relax the pins in \(requirements)"
        } else if let line = lines.last(where: { $0.hasPrefix("ERROR:") }) {
            message = "pip failed for model '\(model)': \(line.dropFirst("ERROR:".count).trimmingCharacters(in: .whitespaces))"
        } else {
            message = "pip failed for model '\(model)'; its output follows"
        }
        return SidecarError(.environmentFailed, message, detail: output)
    }
}

/// Finds the interpreter for a model's environment.
