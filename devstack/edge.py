"""A small edge in front of one backend replica, as Cloud Armor or a load balancer stands in front on Google Cloud.

It forwards every request to the backend unchanged, except the next N requests that match a rule
(a method and a path pattern): those it answers itself, with the status, headers and body the rule
gives, and the backend never sees them. So a test can make a 429 with ``Retry-After`` as seconds or as
an HTTP date, a 500 with an HTML body or a 503 happen exactly when it wants, without the backend's own
limiter, and see every request a client sent (``seen``), to check that a retry was the same request.

It runs in the test's own process, on threads, bound to 127.0.0.1 on a free port::

    edge = Edge(backend_url).start()
    edge.answer("POST", "/predict", 429, {"Retry-After": "2"}, b'{"error": "too many requests"}')
    ...  # point the browser at edge.url
    edge.stop()
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOST = "127.0.0.1"
# Headers of one connection, not of the message (RFC 9110 section 7.6.1): never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
# Longer than any long poll the backend allows (MAX_WAIT_SECONDS), as a load balancer's timeout is.
UPSTREAM_TIMEOUT_SECONDS = 60


@dataclass
class Rule:
    method: str
    path: re.Pattern[str]  # matched against the whole path, query string included
    status: int
    headers: dict[str, str]
    body: bytes
    times: int  # how many more requests this rule answers


@dataclass
class Seen:
    """One request as the edge received it, and who answered it."""

    at: float  # time.monotonic() when it arrived
    method: str
    path: str
    body: bytes
    status: int = 0
    by_edge: bool = False


@dataclass
class Edge:
    upstream: str  # the backend's base URL, http://127.0.0.1:<port>
    seen: list[Seen] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Edge:
        edge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(time.monotonic(), self.command, self.path, body)
                with edge._lock:
                    edge.seen.append(seen)
                    rule = edge._take(self.command, self.path)
                if rule is not None:
                    seen.status, seen.by_edge = rule.status, True
                    self._reply(rule.status, list(rule.headers.items()), rule.body)
                    return
                status, headers, answer = edge._forward(self.command, self.path, self.headers.items(), body)
                seen.status = status
                self._reply(status, headers, answer)

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

            def log_message(self, format: str, *args) -> None:
                pass  # the test reads `seen`, not stderr

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="edge", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "the edge is not started"
        return f"http://{HOST}:{self._server.server_address[1]}"

    def answer(
        self, method: str, path: str, status: int, headers: dict[str, str] | None = None, body: bytes = b"", times: int = 1
    ) -> None:
        """Answer the next ``times`` requests of ``method`` whose path fully matches the regular expression
        ``path`` with ``status``, ``headers`` and ``body``; the backend does not see them."""
        with self._lock:
            self._rules.append(Rule(method.upper(), re.compile(path), status, dict(headers or {}), body, times))

    def requests(self, method: str, path: str) -> list[Seen]:
        """The requests seen so far of ``method`` whose path fully matches ``path``, in order."""
        pattern = re.compile(path)
        with self._lock:
            return [s for s in self.seen if s.method == method.upper() and pattern.fullmatch(s.path)]

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.seen.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _take(self, method: str, path: str) -> Rule | None:
        for rule in self._rules:
            if rule.times > 0 and rule.method == method and rule.path.fullmatch(path):
                rule.times -= 1
                return rule
        return None

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urlsplit(self.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=UPSTREAM_TIMEOUT_SECONDS)
        try:
            forwarded = {name: value for name, value in headers if name.lower() not in HOP_BY_HOP}
            connection.request(method, path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        except OSError as exc:  # the backend is down: what a load balancer answers then
            return 502, [("Content-Type", "text/plain")], f"edge: the backend did not answer ({exc})".encode()
        finally:
            connection.close()
