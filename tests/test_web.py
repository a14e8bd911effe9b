"""Catalog HTTP client against the loopback web server: retries, faults, cache, proxy."""

from __future__ import annotations

import gzip
import http.client
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from onemarket import web
from onemarket.errors import RemoteError
from onemarket.transfer import local
from onemarket.web import CachedFetcher, describe_request_error, fetch_json, make_session

from tests.servers import free_port, serve_in_thread, stop_serving
from tests.servers.httpd import (
    LAST_MODIFIED,
    QuietHandler,
    StaticHttpServer,
    failing_then,
    loopback_server,
    slow,
    truncated,
)

CATALOG = json.dumps({"apps": [{"name": f"app-{i}", "text": "x" * 50} for i in range(200)]})
THREAD_JOIN_S = 120


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "RETRY_BACKOFF_S", 0.0)


def fetcher(cache: Path | None = None, **kw: float) -> CachedFetcher:
    return CachedFetcher(make_session("OpenNebula 7.0 (Market Driver)"), cache, **kw)


def test_plain_get_sends_user_agent_and_gzip(httpd: StaticHttpServer) -> None:
    httpd.routes["/c.json"] = CATALOG.encode()
    got = fetcher().get(f"{httpd.url}/c.json")
    assert got.body == CATALOG.encode() and not got.from_cache
    req = httpd.requests[-1]
    assert req.headers["User-Agent"] == "OpenNebula 7.0 (Market Driver)"
    assert "gzip" in req.headers["Accept-Encoding"]


def test_gzip_body_is_decoded(httpd: StaticHttpServer) -> None:
    body = CATALOG.encode()

    def gz(h: BaseHTTPRequestHandler) -> None:
        data = gzip.compress(body)
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    httpd.routes["/gz"] = gz
    assert fetcher().get(f"{httpd.url}/gz").body == body


def test_500_then_200_is_retried(httpd: StaticHttpServer) -> None:
    httpd.routes["/c.json"] = failing_then(b'{"ok": 1}', failures=2)
    doc, from_cache = fetch_json(fetcher(), f"{httpd.url}/c.json")
    assert doc == {"ok": 1} and not from_cache
    assert httpd.count("/c.json") == 3


def test_persistent_500_gives_up_after_bounded_retries(httpd: StaticHttpServer) -> None:
    httpd.routes["/c.json"] = failing_then(b"", failures=100, status=503)
    with pytest.raises(RemoteError) as err:
        fetcher().get(f"{httpd.url}/c.json")
    assert str(err.value) == f"{httpd.url}/c.json answered HTTP 503 Service Unavailable"
    assert httpd.count("/c.json") == web.RETRY_COUNT + 1


def test_404_names_url_and_status(httpd: StaticHttpServer) -> None:
    with pytest.raises(RemoteError) as err:
        fetcher().get(f"{httpd.url}/missing.json")
    assert str(err.value) == f"{httpd.url}/missing.json answered HTTP 404 Not Found"
    assert httpd.count("/missing.json") == 1  # a 404 is not retried


def test_redirect_is_followed(httpd: StaticHttpServer) -> None:
    httpd.routes["/new"] = b"moved here"

    def moved(h: BaseHTTPRequestHandler) -> None:
        h.send_response(301)
        h.send_header("Location", "/new")
        h.send_header("Content-Length", "0")
        h.end_headers()

    httpd.routes["/old"] = moved
    assert fetcher().get(f"{httpd.url}/old").body == b"moved here"


def test_read_timeout_from_constructor(httpd: StaticHttpServer) -> None:
    httpd.routes["/slow"] = slow(3.0, b"late")
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        fetcher(read_timeout_s=0.2).get(f"{httpd.url}/slow")
    assert str(err.value) == f"cannot fetch {httpd.url}/slow: timed out"
    assert httpd.count("/slow") == web.RETRY_COUNT + 1
    assert time.monotonic() - started < 3.0 * (web.RETRY_COUNT + 1)


def test_read_timeout_from_module_constant(
    httpd: StaticHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "READ_TIMEOUT_S", 0.2)
    monkeypatch.setattr(web, "RETRY_COUNT", 0)
    httpd.routes["/slow"] = slow(3.0, b"late")
    with pytest.raises(RemoteError, match="timed out"):
        fetcher().get(f"{httpd.url}/slow")
    assert httpd.count("/slow") == 1


def test_timeouts_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "CONNECT_TIMEOUT_S", 1.5)
    monkeypatch.setattr(web, "READ_TIMEOUT_S", 2.5)
    assert fetcher()._timeouts() == (1.5, 2.5)
    assert fetcher(connect_timeout_s=0.1, read_timeout_s=0.3)._timeouts() == (0.1, 0.3)


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}/c.json"
    with pytest.raises(RemoteError) as err:
        fetcher().get(url)
    assert str(err.value) == f"cannot fetch {url}: connection refused"


def test_truncated_body(httpd: StaticHttpServer) -> None:
    httpd.routes["/t"] = truncated(CATALOG.encode(), keep=100)
    with pytest.raises(RemoteError) as err:
        fetcher().get(f"{httpd.url}/t")
    assert str(err.value) == (
        f"download of {httpd.url}/t failed: "
        "connection closed before the end of the answer (truncated)"
    )
    assert httpd.count("/t") == web.BODY_RETRY_COUNT + 1


def test_body_cut_once_is_fetched_again(httpd: StaticHttpServer) -> None:
    body = CATALOG.encode()
    cut = truncated(body, keep=100)
    calls = {"n": 0}

    def once(h: BaseHTTPRequestHandler) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            cut(h)
        else:
            httpd.serve_bytes(h, body)

    httpd.routes["/t"] = once
    assert fetcher().get(f"{httpd.url}/t").body == body
    assert httpd.count("/t") == 2


def test_stalled_body_times_out(httpd: StaticHttpServer) -> None:
    def stall(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.wfile.flush()
        time.sleep(2.0)

    httpd.routes["/stall"] = stall
    with pytest.raises(RemoteError) as err:
        fetcher(read_timeout_s=0.2).get(f"{httpd.url}/stall")
    assert str(err.value) == f"download of {httpd.url}/stall failed: timed out"


def test_corrupt_gzip_body(httpd: StaticHttpServer) -> None:
    def bad(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", "20")
        h.end_headers()
        h.wfile.write(b"\x1f\x8bnot really gzip at")

    httpd.routes["/bad"] = bad
    with pytest.raises(RemoteError, match="could not be decompressed"):
        fetcher().get(f"{httpd.url}/bad")


def test_body_size_bound(httpd: StaticHttpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "MAX_BODY_BYTES", 1000)
    httpd.routes["/big"] = b"x" * 5000
    with pytest.raises(RemoteError, match="answered more than 1000 bytes"):
        fetcher().get(f"{httpd.url}/big")


def test_fetch_json_refuses_html(httpd: StaticHttpServer) -> None:
    httpd.routes["/html"] = b"<html><body>maintenance</body></html>"
    with pytest.raises(RemoteError) as err:
        fetch_json(fetcher(), f"{httpd.url}/html")
    assert str(err.value) == f"{httpd.url}/html did not answer valid JSON (JSONDecodeError)"


def test_describe_request_error() -> None:
    assert describe_request_error(requests.ConnectTimeout()) == "timed out"
    assert describe_request_error(requests.exceptions.SSLError("x")) == "TLS error"
    assert (
        describe_request_error(requests.ConnectionError("[Errno -2] Name or service not known"))
        == "host name not found"
    )
    assert describe_request_error(requests.TooManyRedirects()) == "too many redirects"
    assert describe_request_error(requests.ConnectionError("Read timed out.")) == "timed out"
    assert describe_request_error(requests.exceptions.InvalidURL()) == "InvalidURL"


# --------------------------------------------------------------------------- conditional GET cache


def test_etag_cache_reused_on_304(httpd: StaticHttpServer, tmp_path: Path) -> None:
    httpd.routes["/c.json"] = CATALOG.encode()
    url = f"{httpd.url}/c.json"
    first = fetcher(tmp_path).get(url)
    assert not first.from_cache
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".http"
    meta = json.loads(entries[0].read_bytes().split(b"\n", 1)[0])
    assert meta["etag"] and meta["last_modified"] == LAST_MODIFIED
    assert meta["length"] == len(CATALOG)

    second = fetcher(tmp_path).get(url)
    assert second.from_cache and second.body == CATALOG.encode()
    assert httpd.requests[-1].headers["If-None-Match"] == meta["etag"]
    assert httpd.requests[-1].headers["If-Modified-Since"] == LAST_MODIFIED

    httpd.routes["/c.json"] = b'{"changed": true}'
    third = fetcher(tmp_path).get(url)
    assert not third.from_cache and third.body == b'{"changed": true}'
    assert fetcher(tmp_path).get(url).from_cache


def test_last_modified_only(httpd: StaticHttpServer, tmp_path: Path) -> None:
    def lm(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("If-Modified-Since") == LAST_MODIFIED:
            h.send_response(304)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Last-Modified", LAST_MODIFIED)
        h.send_header("Content-Length", "5")
        h.end_headers()
        h.wfile.write(b"hello")

    httpd.routes["/lm"] = lm
    assert not fetcher(tmp_path).get(f"{httpd.url}/lm").from_cache
    again = fetcher(tmp_path).get(f"{httpd.url}/lm")
    assert again.from_cache and again.body == b"hello"
    assert "If-None-Match" not in httpd.requests[-1].headers


def test_cache_is_per_user_agent(httpd: StaticHttpServer, tmp_path: Path) -> None:
    httpd.routes["/c.json"] = CATALOG.encode()
    fetcher(tmp_path).get(f"{httpd.url}/c.json")
    other = CachedFetcher(make_session("OpenNebula 6.10 (Market Driver)"), tmp_path)
    assert not other.get(f"{httpd.url}/c.json").from_cache
    assert len(list(tmp_path.glob("*.http"))) == 2


def test_answer_without_validators_drops_the_entry(httpd: StaticHttpServer, tmp_path: Path) -> None:
    httpd.routes["/c.json"] = b"v1"
    fetcher(tmp_path).get(f"{httpd.url}/c.json")
    assert len(list(tmp_path.glob("*.http"))) == 1
    httpd.validators = False
    httpd.routes["/c.json"] = b"v2"
    assert fetcher(tmp_path).get(f"{httpd.url}/c.json").body == b"v2"
    assert list(tmp_path.glob("*.http")) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # torn body
        lambda raw: b"not json\n" + raw.split(b"\n", 1)[1],
        lambda raw: b"",
        lambda raw: b'["a list"]\n' + raw.split(b"\n", 1)[1],
    ],
)
def test_damaged_entry_is_ignored(httpd: StaticHttpServer, tmp_path: Path, damage) -> None:
    httpd.routes["/c.json"] = CATALOG.encode()
    fetcher(tmp_path).get(f"{httpd.url}/c.json")
    (entry,) = tmp_path.glob("*.http")
    entry.write_bytes(damage(entry.read_bytes()))
    got = fetcher(tmp_path).get(f"{httpd.url}/c.json")
    assert not got.from_cache and got.body == CATALOG.encode()
    assert "If-None-Match" not in httpd.requests[-1].headers


def test_cache_write_is_atomic(
    httpd: StaticHttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpd.routes["/c.json"] = CATALOG.encode()
    stale = tmp_path / ".tmp-killed.http"
    stale.write_bytes(b"left by a killed monitor")
    os.utime(stale, (time.time() - 2 * web.STALE_TMP_S,) * 2)
    fresh = tmp_path / ".tmp-running.http"
    fresh.write_bytes(b"being written right now")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.os, "rename", broken_replace)
    got = fetcher(tmp_path).get(f"{httpd.url}/c.json")
    assert got.body == CATALOG.encode()  # a cache that cannot be written costs nothing more
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-running.http"]

    monkeypatch.undo()
    monkeypatch.setattr(web, "RETRY_BACKOFF_S", 0.0)
    fetcher(tmp_path).get(f"{httpd.url}/c.json")
    assert len(list(tmp_path.glob("[0-9a-f]*.http"))) == 1
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == [".tmp-running.http"]


def test_unwritable_cache_dir(httpd: StaticHttpServer, tmp_path: Path) -> None:
    httpd.routes["/c.json"] = b"body"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert fetcher(blocker / "cache").get(f"{httpd.url}/c.json").body == b"body"


def test_concurrent_fetchers_never_see_a_torn_entry(
    httpd: StaticHttpServer, tmp_path: Path
) -> None:
    """Threads share one cache folder while the catalog changes under them."""
    bodies = [bytes([65 + i]) * (512 * 1024 + i) for i in range(3)]
    turn = {"n": 0}
    lock = threading.Lock()

    def changing(h: BaseHTTPRequestHandler) -> None:
        with lock:
            turn["n"] += 1
            body = bodies[(turn["n"] // 7) % len(bodies)]
        httpd.serve_bytes(h, body)

    httpd.routes["/c.json"] = changing
    url = f"{httpd.url}/c.json"
    seen: list[tuple[bytes, bool]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        f = fetcher(tmp_path)
        try:
            for _ in range(15):
                got = f.get(url)
                seen.append((got.body, got.from_cache))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_JOIN_S)
    assert not errors, errors
    assert len(seen) == 6 * 15
    assert all(body in bodies for body, _ in seen)
    assert any(from_cache for _, from_cache in seen)
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- proxy


class _Proxy:
    """A forward HTTP proxy on loopback that sends every request to one upstream server."""

    def __init__(self, upstream_port: int) -> None:
        self.seen: list[str] = []
        owner = self

        class _H(QuietHandler):
            def do_GET(self) -> None:
                owner.seen.append(self.path)
                target = urlsplit(self.path)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request("GET", target.path or "/", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

        self.server = loopback_server(_H)
        self.port = self.server.server_address[1]

    def __enter__(self) -> _Proxy:
        serve_in_thread(self.server)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_serving(self.server)


@pytest.fixture
def proxy(httpd: StaticHttpServer) -> Iterator[_Proxy]:
    with _Proxy(httpd.port) as p:
        yield p


@pytest.mark.parametrize("var", ["http_proxy", "HTTP_PROXY"])
def test_proxy_from_environment(
    httpd: StaticHttpServer, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    """A name that only the proxy can resolve proves the request went through it."""
    httpd.routes["/c.json"] = CATALOG.encode()
    monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    doc, _ = fetch_json(fetcher(), "http://catalog.invalid/c.json")
    assert doc == json.loads(CATALOG)
    assert proxy.seen == ["http://catalog.invalid/c.json"]


def test_no_proxy_is_honoured(
    httpd: StaticHttpServer, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpd.routes["/c.json"] = b"direct"
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert fetcher().get(f"{httpd.url}/c.json").body == b"direct"
    assert proxy.seen == []


# --------------------------------------------------------------------------- hostile catalogs


def test_one_invalid_utf8_byte_is_replaced_not_fatal(httpd: StaticHttpServer) -> None:
    httpd.routes["/c.json"] = b'\xef\xbb\xbf{"apps": [{"name": "caf\xe9"}, {"name": "ok"}]}'
    doc, _ = fetch_json(fetcher(), f"{httpd.url}/c.json")
    assert doc == {"apps": [{"name": "caf\ufffd"}, {"name": "ok"}]}


def test_value_bound_refuses_before_building_anything(httpd: StaticHttpServer) -> None:
    """``{"appliances":[{},{},...]}``: refused on the count of value starts, so the parse never
    allocates (tracemalloc: the peak stays below the body itself, not 25x it)."""
    import tracemalloc

    entries = 300_000
    body = b'{"appliances":[' + b",".join([b"{}"] * entries) + b"]}"
    bound = web.json_value_bound(body)
    assert bound == 2 * entries + 3  # every '{', ',' and the top level's '{', '[', ':'
    tracemalloc.start()
    try:
        with pytest.raises(RemoteError) as err:
            web.loads_bounded(body, "http://127.0.0.1:1/appliance", max_values=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "more than 100000 values" in str(err.value)
    assert peak < len(body)
    assert web.loads_bounded(body, "http://127.0.0.1:1/a", max_values=bound) == {
        "appliances": [{}] * entries
    }
    httpd.routes["/c.json"] = body
    with pytest.raises(RemoteError, match="more than 1000 values"):
        fetch_json(fetcher(), f"{httpd.url}/c.json", max_values=1000)


def test_body_bound_per_fetcher(httpd: StaticHttpServer) -> None:
    httpd.routes["/big"] = b"x" * 5000
    with pytest.raises(RemoteError, match="answered more than 1000 bytes"):
        CachedFetcher(make_session("ua"), None, max_body_bytes=1000).get(f"{httpd.url}/big")
    assert fetcher().get(f"{httpd.url}/big").body == b"x" * 5000


def test_integers_past_the_digit_bound_read_as_floats_not_a_failed_document() -> None:
    """int() raises past 4,300 digits; one such field must not fail the whole catalog."""
    exact = "1" * web.MAX_INT_DIGITS
    body = f"[{'9' * 5000}, -{'9' * 5000}, {exact}, -{exact}0, 7]".encode()
    doc = web.loads_bounded(body, "http://127.0.0.1:1/a")
    assert doc == [math.inf, -math.inf, int(exact), -float(exact + "0"), 7]
    assert [type(v) for v in doc] == [float, float, int, float, int]


def test_deeply_nested_json_is_one_line_failure() -> None:
    with pytest.raises(RemoteError, match="nested too deeply"):
        web.loads_bounded(b"[" * 200_000 + b"]" * 200_000, "http://127.0.0.1:1/a", 10**6)


def test_url_forms_without_password() -> None:
    url = "http://user:s3cr3t-pw@cat.example:8080/path/?q=1"
    assert web.display_url(url) == "http://user:****@cat.example:8080/path/?q=1"
    assert web.cache_url(url) == "http://user@cat.example:8080/path/?q=1"
    assert web.public_url(url) == "http://cat.example:8080/path/?q=1"
    plain = "https://marketplace.opennebula.io/appliance"
    assert web.display_url(plain) == web.cache_url(plain) == web.public_url(plain) == plain
    assert "s3cr3t" not in web.public_url("http://u:s3cr3t@[bad/")


def test_credentials_reach_the_server_not_the_cache_or_messages(
    httpd: StaticHttpServer, tmp_path: Path
) -> None:
    secret = "s3cr3t-pw"
    httpd.routes["/c.json"] = CATALOG.encode()
    base = httpd.url.replace("http://", f"http://user:{secret}@")
    assert fetcher(tmp_path).get(f"{base}/c.json").body == CATALOG.encode()
    assert httpd.requests[-1].headers["Authorization"].startswith("Basic ")
    (entry,) = tmp_path.glob("*.http")
    assert secret not in entry.name
    meta = json.loads(entry.read_bytes().split(b"\n", 1)[0])
    assert meta["url"] == f"{httpd.url.replace('http://', 'http://user@')}/c.json"
    assert secret.encode() not in entry.read_bytes()
    with pytest.raises(RemoteError) as err:
        fetcher(tmp_path).get(f"{base}/missing")
    assert secret not in str(err.value) and "user:****@" in str(err.value)
    refused = f"http://user:{secret}@127.0.0.1:{free_port()}/c.json"
    with pytest.raises(RemoteError) as err:
        fetcher(tmp_path).get(refused)
    assert secret not in str(err.value)


@pytest.mark.parametrize("debug", [False, True])
def test_retries_log_no_warnings(debug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3's ``Retrying (...)`` WARNINGs (three per unreachable catalog) are DEBUG records:
    an action's stderr gets no WARN line from them, only the caller's one failure line."""
    import io
    import logging

    from onemarket import driverlog

    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("urllib3").level)
    monkeypatch.setattr(driverlog, "stream", out)
    driverlog.set_debug(debug)
    try:
        driverlog.route_std_logging()
        url = f"http://127.0.0.1:{free_port()}/c.json"
        with pytest.raises(RemoteError, match="connection refused"):
            fetcher().get(url)
    finally:
        driverlog.set_debug(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("urllib3").setLevel(saved[2])
    lines = out.getvalue().splitlines()
    assert not [ln for ln in lines if not ln.startswith("DEBUG: ")]
    retries = [ln for ln in lines if "Retrying" in ln]
    assert len(retries) == (web.RETRY_COUNT if debug else 0)
