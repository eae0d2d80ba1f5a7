import AsyncHTTPClient
import Foundation
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Sidecar

/// The repository behind an HTTP(S) base URL: any web server or object store serving the
/// repository directory, or another Sidecar node's `/repository/`. The manifest is fetched with
/// `If-None-Match` (or `If-Modified-Since`), so an unchanged one is a 304 and no body.
public struct HTTPRepository: RepositorySource {
    public let base: String
    let client: HTTPClient
    /// For the manifest, a small file: an unreachable repository is reported within it.
    let manifestTimeout: TimeAmount
    /// For a bundle or a file, which may be gigabytes: the whole download's deadline.
    let downloadTimeout: TimeAmount

    public init(
        base: String, client: HTTPClient = .shared, manifestTimeout: TimeAmount = .seconds(5), downloadTimeout: TimeAmount = .hours(1)
    ) {
        self.base = base.hasSuffix("/") ? base : base + "/"
        self.client = client
        self.manifestTimeout = manifestTimeout
        self.downloadTimeout = downloadTimeout
    }

    public var description: String { base }

    public func manifest(ifChangedFrom tag: String?) async throws -> ManifestFetch {
        var request = HTTPClientRequest(url: base + "manifest.json")
        if let tag {
            // The tag is the validator the server gave: an ETag, or a Last-Modified date.
            if tag.hasPrefix("etag:") { request.headers.add(name: "If-None-Match", value: String(tag.dropFirst(5))) }
            if tag.hasPrefix("date:") { request.headers.add(name: "If-Modified-Since", value: String(tag.dropFirst(5))) }
        }
        let response = try await send(request, what: "manifest.json", timeout: manifestTimeout)
        if response.status == .notModified { return .unchanged }
        guard response.status == .ok else {
            throw SidecarError(.unavailable, "GET \(base)manifest.json answered \(response.status.code) \(response.status.reasonPhrase)")
        }
        let body = try await response.body.collect(upTo: 16 << 20)
        let newTag = response.headers.first(name: "ETag").map { "etag:" + $0 }
            ?? response.headers.first(name: "Last-Modified").map { "date:" + $0 }
        return .changed(Data(buffer: body), tag: newTag)
    }

    public func fetch(_ path: String, limit: Int) async throws -> Data {
        let url = base + path
        let response = try await send(HTTPClientRequest(url: url), what: path, timeout: downloadTimeout)
        guard response.status == .ok else {
            throw SidecarError(.unavailable, "GET \(url) answered \(response.status.code) \(response.status.reasonPhrase)")
        }
        do {
            return Data(buffer: try await response.body.collect(upTo: limit))
        } catch is NIOTooManyBytesError {
            throw SidecarError(.invalidInput, "\(url) is over the limit of \(limit) bytes")
        } catch {
            // A connection cut mid-body: a truncated download, retried by the caller.
            throw SidecarError(.unavailable, "fetching \(url) was cut off: \(error)", cause: error)
        }
    }

    private func send(_ request: HTTPClientRequest, what: String, timeout: TimeAmount) async throws -> HTTPClientResponse {
        do {
            return try await client.execute(request, timeout: timeout)
        } catch {
            throw SidecarError(.unavailable, "cannot reach \(base) for \(what): \(error)", cause: error)
        }
    }
}

/// The repository source `text` names: an http(s) base URL, else a directory.
public func repositorySource(_ text: String) -> any RepositorySource {
    if text.hasPrefix("http://") || text.hasPrefix("https://") { return HTTPRepository(base: text) }
    return DirectoryRepository(root: URL(fileURLWithPath: text))
}
