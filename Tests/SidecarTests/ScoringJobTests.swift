import Foundation
import Testing
@testable import Sidecar

@Suite struct ScoringJobTests {
    private func file(_ text: String, _ name: String = "input.jsonl") throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-job-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let url = dir.appendingPathComponent(name)
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    private func records(_ text: String, _ format: ScoringJobFormat, idField: String = "id") throws -> [JobRecord] {
        let reader = try JobRecordReader(path: try file(text, format == .csv ? "input.csv" : "input.jsonl"), format: format, idField: idField)
        var all: [JobRecord] = []
        while let record = try reader.next() { all.append(record) }
        return all
    }

    private func text(_ record: JobRecord) -> String {
        switch record.item {
        case .success(let data): String(decoding: data, as: UTF8.self)
        case .failure(let error): "ERROR: \(error.reason)"
        }
    }

    @Test func jsonLinesKeepLineNumbersSkipBlanksAndReadIDs() throws {
        let all = try records("{\"id\": \"a\", \"x\": 1}\n\n  \n[1, 2]\n{\"x\": {\"id\": 9}, \"id\": 7}\n{\"id\": \"no end\"", .jsonl)
        #expect(all.map(\.line) == [1, 4, 5, 6])
        #expect(text(all[1]) == "[1, 2]")
        #expect(all.map { $0.id.map { String(decoding: $0, as: UTF8.self) } } == ["\"a\"", nil, "7", "\"no end\""])
    }

    @Test func csvQuotingNumbersEmptiesAndMalformedRows() throws {
        let csv = "\u{FEFF}id,name,score\r\n1,\"a, b\",3.5\r\n2,\"say \"\"hi\"\"\",\n3,\"two\nlines\",x1\n4,too,many,fields\n5,bad\"quote,1\n6,-0.5e3,007\n7,\"open\n"
        let all = try records(csv, .csv)
        #expect(all.map(\.line) == [2, 3, 4, 6, 7, 8, 9])
        #expect(text(all[0]) == #"{"id":1,"name":"a, b","score":3.5}"#)
        #expect(text(all[1]) == #"{"id":2,"name":"say \"hi\"","score":null}"#)
        #expect(text(all[2]) == #"{"id":3,"name":"two\nlines","score":"x1"}"#)
        #expect(text(all[3]) == "ERROR: the row has 4 field(s), the header 3")
        #expect(text(all[4]).hasPrefix("ERROR: a quote inside an unquoted field (field 2)"))
        // "007" is not a JSON number, so it stays a string; -0.5e3 is one.
        #expect(text(all[5]) == #"{"id":6,"name":-0.5e3,"score":"007"}"#)
        #expect(text(all[6]) == "ERROR: a quoted field opened on line 9 never closes")
        #expect(all[0].id.map { String(decoding: $0, as: UTF8.self) } == "1")
        // Found by the fuzzer (Fuzz/regressions/job-records): JSON's grammar, but no float.
        #expect(text(try records("a,b\n3e500,-0.\n", .csv)[0]) == #"{"a":"3e500","b":"-0."}"#)
    }

    @Test func jsonFieldLooksOnlyAtTheTopLevel() {
        func raw(_ json: String, _ key: String = "id") -> String? { JSONField.raw(key, in: Data(json.utf8)).map { String(decoding: $0, as: UTF8.self) } }
        #expect(raw(#"{"a": "x\"id\"", "b": [1, {"id": 2}], "id": [3, 4]}"#) == "[3, 4]")
        #expect(raw(#"{"a": 1}"#) == nil)
        #expect(raw(#"[{"id": 1}]"#) == nil)
        #expect(raw(#"{"id": "#) == nil)
        #expect(raw(#"{"i\"d": 1, "id": true}"#) == "true")
        // Found by the fuzzer (Fuzz/regressions/job-records): a repeated key is read as the worker's
        // json.loads reads it, the last one winning.
        #expect(raw(#"{"id": {"id": 1}, "id": 3}"#) == "3")
        #expect(raw(#"{"i\u0064": 5}"#) == "5")
        #expect(raw(#"{}"#) == nil)
        #expect(raw(#"{"id": 1, "#) == "1")
        for number in ["0", "-1", "1.5", "2e10", "-0.0E-3"] { #expect(JSONField.isNumber(number), "\(number)") }
        for text in ["", "-", "01", "1.", ".5", "1e", "0x10", "inf", "NaN", "1,5", " 1"] { #expect(!JSONField.isNumber(text), "\(text)") }
    }

    @Test func journalResumesOnlyWhatItListsAndRefusesAChangedJob() throws {
        let input = try file("1\n2\n3\n")
        var spec = ScoringJobSpec(input: input, output: input + ".out")
        spec.spanLines = 1
        let first = try JobJournal(spec: spec)
        try first.commit(span: 0, output: Array("zero\n".utf8), errors: [], ok: 1, failed: 0)
        try first.commit(span: 2, output: Array("two\n".utf8), errors: Array("e2\n".utf8), ok: 1, failed: 1)
        // A crash here: a new run must be asked to resume, and then knows spans 0 and 2.
        #expect(throws: SidecarError.self) { try JobJournal(spec: spec) }
        spec.resume = true
        let second = try JobJournal(spec: spec)
        #expect(second.finished.keys.sorted() == [0, 2])
        #expect(second.finished[2]?.failed == 1)
        try second.commit(span: 1, output: Array("one\n".utf8), errors: [], ok: 1, failed: 0)
        var changed = spec
        changed.spanLines = 2
        let error = #expect(throws: SidecarError.self) { try JobJournal(spec: changed) }
        #expect(error?.message.contains("span_lines was 1, now 2") == true)
        try second.finish(spans: 3)
        #expect(try String(contentsOfFile: spec.output, encoding: .utf8) == "zero\none\ntwo\n")
        #expect(try String(contentsOfFile: spec.errorsPath, encoding: .utf8) == "e2\n")
        #expect(!FileManager.default.fileExists(atPath: spec.jobDirectory))
    }

    /// A real job through Python workers: output in input order, malformed lines and raising items
    /// as error lines, nothing else lost.
    @Test func scoresThroughWorkersWithErrorLinesInOrder() async throws {
        let dir = try Fixtures.model([
            "handler.py": """
                def predict(items):
                    out = []
                    for item in items:
                        if item == "boom":
                            raise ValueError("boom item")
                        out.append(item)
                    return out
                """,
            "sidecar.yaml": "batching: {max_batch_size: 8, max_queue: 64}\n",
        ])
        var lines: [String] = []
        for i in 0..<500 { lines.append(i % 97 == 5 ? "\"boom\"" : i % 101 == 3 ? "{not json" : "{\"id\": \(i), \"v\": \(i)}") }
        let input = try file(lines.joined(separator: "\n") + "\n")
        var spec = ScoringJobSpec(input: input, output: input + ".out")
        spec.spanLines = 64
        let job = try ScoringJob(spec: spec)
        let progress = try await withModel(at: dir.path, workers: 2, options: Fixtures.hostOptions, logger: Fixtures.logger) { model in
            try await job.run(on: model)
        }
        let bad = (0..<500).filter { $0 % 97 == 5 || $0 % 101 == 3 }
        #expect(progress.state == .completed)
        #expect(progress.failed == bad.count)
        #expect(progress.ok == 500 - bad.count)
        let output = try String(contentsOfFile: spec.output, encoding: .utf8).split(separator: "\n")
        let good = (0..<500).filter { !bad.contains($0) }
        #expect(output.count == good.count)
        #expect(output.first == #"{"line":1,"id":0,"prediction":{"id":0,"v":0}}"#)
        #expect(output.map { Int($0.split(separator: ",")[0].dropFirst(8))! } == good.map { $0 + 1 })
        let errors = try String(contentsOfFile: spec.errorsPath, encoding: .utf8).split(separator: "\n")
        #expect(errors.map { Int($0.split(separator: ",")[0].dropFirst(8))! } == bad.map { $0 + 1 })
        #expect(errors.contains { $0.contains("ValueError: boom item") })
        #expect(errors.contains { $0.contains("InvalidJSON") })
    }
}
