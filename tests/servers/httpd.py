"""A small threaded web server on 127.0.0.1 for catalog and download tests.

Routes map a path to bytes (served with ETag, Last-Modified, 304 on matching validators,
gzip when asked, Range requests) or to a callable that writes its own answer, which is how
tests inject faults (500 then 200, truncated bodies, slow answers, redirects). Every request
is recorded so tests can count them.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.servers import running, serve_in_thread, stop_serving

Handler = Callable[[BaseHTTPRequestHandler], None]
LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) and no access log on the test's stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


def loopback_server(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on a free 127.0.0.1 port (``server_address[1]``), not serving
    yet: :func:`tests.servers.serve_in_thread` starts it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class StaticHttpServer:
    routes: dict[str, bytes | Handler] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    validators: bool = True

    def start(self) -> None:
        owner = self

        class _H(QuietHandler):
            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def do_GET(self, head: bool = False) -> None:
                path = self.path.split("?", 1)[0]
                owner.requests.append(Recorded(self.command, self.path, dict(self.headers)))
                route = owner.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if callable(route):
                    route(self)
                    return
                owner.serve_bytes(self, route, head)

        self.httpd = loopback_server(_H)
        self.port = self.httpd.server_address[1]
        self.thread = serve_in_thread(self.httpd)

    def stop(self) -> None:
        stop_serving(self.httpd)

    def add_tree(self, root: Path) -> None:
        """Serve every file below ``root`` at its relative path (read now, into memory)."""
        for path in root.rglob("*"):
            if path.is_file():
                self.routes["/" + path.relative_to(root).as_posix()] = path.read_bytes()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str, method: str = "GET") -> int:
        return sum(1 for r in self.requests if r.path.split("?")[0] == path and r.method == method)

    def serve_bytes(self, h: BaseHTTPRequestHandler, body: bytes, head: bool = False) -> None:
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if self.validators and (
            h.headers.get("If-None-Match") == etag
            or (
                h.headers.get("If-Modified-Since") == LAST_MODIFIED
                and not h.headers.get("If-None-Match")
            )
        ):
            h.send_response(304)
            h.send_header("ETag", etag)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        status = 200
        rng = h.headers.get("Range")
        headers: dict[str, str] = {"Accept-Ranges": "bytes"}
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = min(int(end_s) if end_s else len(body) - 1, len(body) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            body = body[start : end + 1]
            status = 206
        elif "gzip" in h.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        h.send_response(status)
        if self.validators:
            headers["ETag"] = etag
            headers["Last-Modified"] = LAST_MODIFIED
        headers["Content-Length"] = str(len(body))
        headers.setdefault("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


def failing_then(body: bytes, failures: int, status: int = 500) -> Handler:
    """A route answering ``status`` ``failures`` times, then ``body``."""
    left = {"n": failures}

    def handler(h: BaseHTTPRequestHandler) -> None:
        if left["n"] > 0:
            left["n"] -= 1
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handler


def truncated(body: bytes, keep: int) -> Handler:
    """A route announcing ``len(body)`` bytes but closing after ``keep`` of them."""

    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:keep])
        h.wfile.flush()
        h.close_connection = True

    return handler


def slow(delay_s: float, body: bytes = b"") -> Handler:
    def handler(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay_s)
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handler


@pytest.fixture
def httpd() -> Iterator[StaticHttpServer]:
    with running(StaticHttpServer()) as server:
        yield server
