import CPython
import Foundation

/// A strong reference to a Python object. Only ever used with the GIL held, on a Python thread;
/// `Sendable` so that it can be stored in the executor and handed between those threads.
struct PythonObject: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<PyObject>
}

/// The few C API calls the embedded executor makes, each with the GIL held by the calling thread.
/// Failures come back as the Python exception's type, message and formatted traceback.
enum PythonCalls {
    struct Failure: Error, Sendable {
        var type: String
        var message: String
        var traceback: String

        var headline: String { "\(type): \(message)" }
    }

    static func string(_ value: String) -> UnsafeMutablePointer<PyObject>? { PyUnicode_FromString(value) }

    /// `PyImport_ImportModule(name)` (new reference).
    static func importModule(_ name: String) -> Result<PythonObject, Failure> {
        guard let module = PyImport_ImportModule(name) else { return .failure(fetchError()) }
        return .success(PythonObject(pointer: module))
    }

    /// `getattr(object, name)` (new reference).
    static func attribute(_ object: PythonObject, _ name: String) -> Result<PythonObject, Failure> {
        guard let value = PyObject_GetAttrString(object.pointer, name) else { return .failure(fetchError()) }
        return .success(PythonObject(pointer: value))
    }

    /// `callable(*arguments)`; the arguments are references this call takes over (stolen), nil
    /// arguments (a failed conversion) fail the call.
    static func call(_ callable: PythonObject, _ arguments: [UnsafeMutablePointer<PyObject>?]) -> Result<PythonObject, Failure> {
        guard let tuple = PyTuple_New(arguments.count) else { return .failure(fetchError()) }
        defer { Py_DecRef(tuple) }
        for (index, argument) in arguments.enumerated() {
            guard let argument else {
                for rest in arguments[index...] { Py_DecRef(rest) }
                return .failure(fetchError())
            }
            PyTuple_SetItem(tuple, index, argument)  // steals `argument`
        }
        guard let result = PyObject_CallObject(callable.pointer, tuple) else { return .failure(fetchError()) }
        return .success(PythonObject(pointer: result))
    }

    /// `callable(data)` for a bytes argument, the hot path of every batch.
    static func call(_ callable: PythonObject, bytes: [UInt8]) -> Result<PythonObject, Failure> {
        let argument = bytes.withUnsafeBufferPointer { buffer in
            buffer.baseAddress.map { base in
                base.withMemoryRebound(to: CChar.self, capacity: buffer.count) { PyBytes_FromStringAndSize($0, buffer.count) }
            } ?? PyBytes_FromStringAndSize(nil, 0)
        }
        return call(callable, [argument])
    }

    /// The content of a `bytes` object, copied out.
    static func bytes(_ object: PythonObject) -> Result<[UInt8], Failure> {
        var buffer: UnsafeMutablePointer<CChar>?
        var length: Py_ssize_t = 0
        guard PyBytes_AsStringAndSize(object.pointer, &buffer, &length) == 0, let buffer else { return .failure(fetchError()) }
        return .success(buffer.withMemoryRebound(to: UInt8.self, capacity: length) { Array(UnsafeBufferPointer(start: $0, count: length)) })
    }

    /// The items of a tuple or list (new references).
    static func items(_ sequence: PythonObject) -> Result<[PythonObject], Failure> {
        let count = PySequence_Size(sequence.pointer)
        guard count >= 0 else { return .failure(fetchError()) }
        var items: [PythonObject] = []
        for index in 0..<count {
            guard let item = PySequence_GetItem(sequence.pointer, index) else {
                items.forEach(release)
                return .failure(fetchError())
            }
            items.append(PythonObject(pointer: item))
        }
        return .success(items)
    }

    /// `str(object)`, or nil.
    static func text(_ object: UnsafeMutablePointer<PyObject>?) -> String? {
        guard let object, let str = PyObject_Str(object) else {
            PyErr_Clear()
            return nil
        }
        defer { Py_DecRef(str) }
        guard let utf8 = PyUnicode_AsUTF8(str) else {
            PyErr_Clear()
            return nil
        }
        return String(cString: utf8)
    }

    static func release(_ object: PythonObject) { Py_DecRef(object.pointer) }

    /// Takes the pending exception (clearing it) as type name, message and traceback.
    static func fetchError() -> Failure {
        var type: UnsafeMutablePointer<PyObject>?
        var value: UnsafeMutablePointer<PyObject>?
        var traceback: UnsafeMutablePointer<PyObject>?
        PyErr_Fetch(&type, &value, &traceback)
        guard type != nil else { return Failure(type: "SystemError", message: "a Python call failed without an exception", traceback: "") }
        PyErr_NormalizeException(&type, &value, &traceback)
        defer {
            Py_DecRef(type)
            Py_DecRef(value)
            Py_DecRef(traceback)
        }
        let name = PyObject_GetAttrString(type, "__name__")
        defer { Py_DecRef(name) }
        PyErr_Clear()
        return Failure(
            type: text(name) ?? "Exception", message: text(value) ?? "", traceback: formatted(type: type, value: value, traceback: traceback))
    }

    /// `traceback.format_exception(value)` joined (3.10+: the exception alone, its traceback
    /// attached first); empty if that fails too.
    private static func formatted(
        type: UnsafeMutablePointer<PyObject>?, value: UnsafeMutablePointer<PyObject>?, traceback: UnsafeMutablePointer<PyObject>?
    ) -> String {
        guard let value, let module = PyImport_ImportModule("traceback") else {
            PyErr_Clear()
            return ""
        }
        defer { Py_DecRef(module) }
        if let traceback { PyException_SetTraceback(value, traceback) }
        guard let format = PyObject_GetAttrString(module, "format_exception") else {
            PyErr_Clear()
            return ""
        }
        defer { Py_DecRef(format) }
        // Called directly, not through call(_:_:), whose failure would come back here.
        guard let tuple = PyTuple_New(1) else {
            PyErr_Clear()
            return ""
        }
        defer { Py_DecRef(tuple) }
        Py_IncRef(value)
        PyTuple_SetItem(tuple, 0, value)
        guard let lines = PyObject_CallObject(format, tuple) else {
            PyErr_Clear()
            return ""
        }
        defer { Py_DecRef(lines) }
        guard case .success(let parts) = items(PythonObject(pointer: lines)) else {
            PyErr_Clear()
            return ""
        }
        defer { parts.forEach(release) }
        return parts.compactMap { text($0.pointer) }.joined()
    }
}
