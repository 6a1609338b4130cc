"""A recording reverse proxy in front of gcp-storage-emulator: every request is forwarded unchanged, and what it
does (read, write, delete an object; get or change a bucket) is recorded for the identity this proxy serves.

Absolute URLs the emulator answers with (a resumable upload's ``Location``, an object's ``mediaLink``) name the
emulator; they are rewritten to name this proxy, so a client keeps coming through it.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Paths of the JSON API with its prefix taken off; the emulator also serves them without one (Node's client).
_API_PREFIXES = ("/storage/v1", "/upload/storage/v1", "/download/storage/v1")
_BATCH = "/batch/storage/v1"
_BUCKETS = re.compile(r"^/b/?$")
_BUCKET = re.compile(r"^/b/(?P<bucket>[^/]+)(?P<rest>/.*)?$")
_OBJECT = re.compile(r"^/o/[^/]+$")  # one object (its name URL-encoded): /o/<name>
_COPY = re.compile(r"^/o/.+/(?:copyTo|rewriteTo)/b/(?P<dest>[^/]+)/o/.+$")
_XML_OBJECT = re.compile(r"^/(?P<bucket>[^/]+)/.+$")  # the XML API (signed URLs): /<bucket>/<object>
_BATCH_PART = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) (\S+)", re.MULTILINE)
# Headers that describe one hop, not the message (RFC 9110 7.6.1); the proxy sets its own.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
_CHUNK = 1 << 16

Recorded = tuple[str, str]  # (resource, action)


def _bucket(name: str) -> str:
    return f"bucket:{unquote(name)}"


def _bucket_route_uses(method: str, bucket: str, rest: str) -> list[Recorded]:
    """What a request under /b/<bucket> does to that bucket (and, for a copy, to its destination)."""
    if rest in ("", "/", "/acl", "/defaultObjectAcl", "/iam", "/iam/testPermissions"):
        # Bucket metadata: storage.buckets.get (legacyBucketReader, not objectViewer); changing it is admin.
        return [(_bucket(bucket), "bucket_get" if method == "GET" else "bucket_admin")]
    copy = _COPY.match(rest)
    if copy:
        return [(_bucket(bucket), "read"), (_bucket(copy["dest"]), "write")]
    if rest.endswith("/compose"):
        return [(_bucket(bucket), "read"), (_bucket(bucket), "write")]
    if method in ("GET", "HEAD"):  # an object's data or metadata, a listing, an object's ACL
        return [(_bucket(bucket), "read")]
    if method == "DELETE":
        return [(_bucket(bucket), "delete")]
    if method in ("PATCH", "PUT") and _OBJECT.match(rest):
        # An object's metadata changed: storage.objects.update, which objectCreator lacks (objectUser has it).
        return [(_bucket(bucket), "update")]
    return [(_bucket(bucket), "write")]  # insert, resumable chunks, restore


def storage_uses(method: str, target: str, body: bytes = b"") -> list[Recorded]:
    """The (resource, action) pairs one storage request needs: its bucket and what it does there."""
    method = method.upper()
    path = urlsplit(target).path
    if path == _BATCH:  # a batch carries whole requests in its body
        text = body.decode("utf-8", "replace")
        return [use for inner_method, inner in _BATCH_PART.findall(text) for use in storage_uses(inner_method, inner)]
    for prefix in _API_PREFIXES:
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
            break
    if _BUCKETS.match(path):  # list or create buckets: project-level
        return [("project", "bucket_list" if method == "GET" else "bucket_create")]
    bucket = _BUCKET.match(path)
    if bucket:
        return _bucket_route_uses(method, bucket["bucket"], bucket["rest"] or "")
    if path in ("/", "/wipe"):  # the emulator's own health check and reset: no Cloud Storage call
        return []
    xml = _XML_OBJECT.match(path)
    if xml:
        return [(_bucket(xml["bucket"]), "read" if method in ("GET", "HEAD") else "write")]
    return [("unknown", f"{method} {path}")]


def _rewrite(value: bytes, upstream: bytes, proxy: bytes) -> bytes:
    return value.replace(upstream, proxy)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's pooled connections stay usable
    server: StorageProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the stack's logs

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._request_body()
        self.server.record(storage_uses(self.command, self.path, body if self.path.startswith(_BATCH) else b""))
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=300)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            upstream.putheader("Host", self.server.upstream_netloc)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP | {"host", "content-length"}:
                    upstream.putheader(name, value)
            if body or self.command in ("POST", "PUT", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
        except OSError as exc:  # the emulator is down or gone: say so as a gateway would
            upstream.close()
            self.send_error(502, f"gcp-storage-emulator at {self.server.upstream_url}: {exc}")
            return
        try:
            self._answer(response)
        finally:
            upstream.close()

    def _answer(self, response: http.client.HTTPResponse) -> None:
        up, proxy = self.server.upstream_url.encode(), self.server.url.encode()
        length = response.getheader("Content-Length")
        content_type = response.getheader("Content-Type", "")
        # Bodies that may name the emulator (JSON metadata) are rewritten whole; data streams through.
        rewrite_body = length is None or "json" in content_type or content_type.startswith("text/")
        body = _rewrite(response.read(), up, proxy) if rewrite_body else b""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                self.send_header(name, _rewrite(value.encode("latin-1"), up, proxy).decode("latin-1"))
        self.send_header("Content-Length", str(len(body)) if rewrite_body else length)
        self.end_headers()
        if self.command == "HEAD":
            return
        if rewrite_body:
            self.wfile.write(body)
            return
        while chunk := response.read(_CHUNK):
            self.wfile.write(chunk)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


class StorageProxy(ThreadingHTTPServer):
    """Listens on 127.0.0.1:``port`` (0: a free one) and forwards to ``upstream_url``; ``record(uses)`` is told
    every request's (resource, action) pairs before it is forwarded (a refused or failed call still counts)."""

    daemon_threads = True

    def __init__(self, upstream_url: str, record: Callable[[list[Recorded]], None], port: int = 0) -> None:
        parts = urlsplit(upstream_url)
        self.upstream_url = f"{parts.scheme}://{parts.netloc}"
        self.upstream_netloc = parts.netloc
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.record = record
        super().__init__(("127.0.0.1", port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StorageProxy:
        self._thread = threading.Thread(target=self.serve_forever, name=f"storage-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
