import Foundation
import Logging

/// Checks, before any environment is built or worker started, that the handler module parses and
/// binds the entry point's attribute at top level.
///
/// It reads the module with Python's own `ast` (the module is not imported, so nothing of the user's
/// runs and no requirement needs to be installed). Bindings it cannot see statically (`import *`, a
/// module `__getattr__`) make it step aside; the worker's import then has the last word.
enum EntryPointCheck {
    static func verify(_ bundle: ModelBundle, interpreter: String) async throws {
        let parts = bundle.configuration.handler.split(separator: ":", maxSplits: 1).map(String.init)
        let (module, attribute) = (parts[0], String(parts[1].split(separator: ".")[0]))
        let relative = module.replacingOccurrences(of: ".", with: "/")
        let file = [relative + ".py", relative + "/__init__.py"]
            .map { bundle.directory.appendingPathComponent($0) }
            .first { FileManager.default.fileExists(atPath: $0.path) }
        guard let file else { return }  // ModelBundle already reported a missing module
        let outcome = try await ProcessRunner.run(
            interpreter, ["-c", script, file.path, attribute],
            logger: Logger(label: "sidecar.quiet", factory: { _ in SwiftLogNoOpLogHandler() }), label: "entry-point-check")
        let verdict = outcome.lastLines.last ?? ""
        let source = bundle.handlerSource
        if verdict.hasPrefix("syntax-error ") {
            throw SidecarError(
                .invalidModel, "\(verdict.dropFirst("syntax-error ".count)); fix the syntax error (\(source))")
        }
        if verdict == "missing" {
            throw SidecarError(
                .invalidModel,
                "\(file.path): defines no top-level '\(attribute)' for \(source); define it (a function or a class with predict) or point handler: at the right module:attribute")
        }
    }

    /// Prints "found", "dynamic", "missing" or "syntax-error FILE:LINE: MESSAGE".
    private static let script = #"""
        import ast, sys
        path, name = sys.argv[1], sys.argv[2]
        try:
            tree = ast.parse(open(path, "rb").read(), path)
        except SyntaxError as e:
            print(f"syntax-error {e.filename}:{e.lineno}: SyntaxError: {e.msg}")
            sys.exit(0)
        found = dynamic = False
        def visit(statements):
            global found, dynamic
            for node in statements:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found |= node.name == name
                    dynamic |= node.name == "__getattr__"
                elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    found |= any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        dynamic |= alias.name == "*"
                        found |= (alias.asname or alias.name.split(".")[0]) == name
                else:
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, []))
                    for handler in getattr(node, "handlers", []):
                        visit(handler.body)
        visit(tree.body)
        print("found" if found else "dynamic" if dynamic else "missing")
        """#
}
