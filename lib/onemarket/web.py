"""Shared HTTP client for catalogs: connection reuse, gzip, timeouts, bounded retries with
backoff, proxies from the environment (the MAD's ``-p`` sets ``http_proxy``), and a
conditional-GET cache so an unchanged catalog costs the server a 304.

The cache holds one file per URL (validators and body length as a JSON first line, then the
body), written to a temporary name and renamed, so concurrent monitors never read a half-written
entry; an entry whose body does not have the recorded length is ignored. Neither its name nor
its metadata carry the password of an ``http://user:password@host/`` URL (:func:`cache_url`).

A catalog answer is hostile input. It is decoded leniently (bytes that are not UTF-8 become
U+FFFD, the template writer's rule, so one bad byte costs one entry, not the monitor), its body
is bounded (``max_body_bytes``) and so is its parse: before ``json.loads`` builds anything, the
number of JSON values is bounded from above by counting the bytes that can start one
(``{ [ , :``, one C-speed pass), and a document with more than ``max_values`` is refused in one
line. CPython needs at most ~70 bytes per counted value (measured: ``[{},{},...]`` 38, ``[[],...]``
34, ``[{"a":{}},...]`` 66), so ``max_values`` caps the parsed document's memory.

Messages name URLs with the password masked (:func:`display_url`); urllib3's ``Retrying (...)``
warnings become DEBUG records, so a failed fetch is one line from the caller, after the retries.

Timeouts and retry settings are module constants read at each call, so tests can shorten them;
:class:`CachedFetcher` also takes per-instance timeouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import RemoteError, StorageError
from .transfer.local import PRIVATE_FILE_MODE, UNIQUE_PREFIX, atomic_file, sweep_temps, unique_temp
from .units import MAX_INT_DIGITS

CONNECT_TIMEOUT_S = 10.0
"""Longest wait for a TCP connection to a catalog server."""
READ_TIMEOUT_S = 60.0
"""Longest silence while waiting for a catalog server's answer or the next bytes of its body."""
RETRY_COUNT = 3
"""Extra attempts after a connection error, a read timeout or a 5xx answer."""
RETRY_BACKOFF_S = 0.5
"""urllib3 backoff factor: no wait before the first retry, then 1 s, then 2 s."""
MAX_BODY_BYTES = 512 * 1024 * 1024
"""Largest catalog answer accepted by default (readers pass their own bound); it is held in
memory once while parsed, then once more as text."""
DEFAULT_MAX_JSON_VALUES = 2_000_000
"""Default bound of :func:`fetch_json` on the JSON values of a document (about 140 MB parsed,
at ~70 bytes per value); readers pass a bound fitted to their catalog."""
JSON_VALUE_STARTS = (b"{", b"[", b",", b":")
"""Bytes that precede or open every JSON value but the first (inside strings too, so their
count is an upper bound)."""
BODY_CHUNK_BYTES = 1 << 16
"""Read size while receiving a body (memory: one chunk on top of the body being collected)."""
STALE_TMP_S = 3600.0
"""Age after which a temporary cache file (left by a killed monitor) is removed."""
CACHE_SUFFIX = ".http"
"""Ending of a cache entry's name, and of its temporary name while it is written."""
RETRY_STATUSES = (500, 502, 503, 504)
BODY_RETRY_COUNT = 1
"""Extra full GETs when the connection drops while the body is being received."""


def make_session(user_agent: str) -> requests.Session:
    session = requests.Session()
    retry = Retry(
        total=RETRY_COUNT,
        connect=RETRY_COUNT,
        read=RETRY_COUNT,
        status=RETRY_COUNT,
        backoff_factor=RETRY_BACKOFF_S,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    session.headers["Accept-Encoding"] = "gzip, deflate"
    return session


_USERINFO_RE = re.compile(r"(?<=//)[^/?#]*@")


def _with_userinfo(url: str, keep_user: bool, mask: str | None) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: drop anything that looks like user:password@
        return _USERINFO_RE.sub("", url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    if keep_user and user:
        userinfo = f"{user}:{mask}" if has_password and mask else user
        netloc = f"{userinfo}@{hostport}"
    else:
        netloc = hostport
    return urlunsplit(parts._replace(netloc=netloc))


def display_url(url: str) -> str:
    """``url`` for messages: the password of ``user:password@`` masked as ``****``."""
    return _with_userinfo(url, keep_user=True, mask="****")


def cache_url(url: str) -> str:
    """``url`` without its password (the user stays): the cache key and metadata, so nothing
    under the cache folder can reveal the password."""
    return _with_userinfo(url, keep_user=True, mask=None)


def public_url(url: str) -> str:
    """``url`` without ``user:password@``: what an app may show (LINK, descriptions) to every
    user who can see it. Only a URL used for a download (an app's SOURCE) keeps credentials."""
    return _with_userinfo(url, keep_user=False, mask=None)


class _RetryWarningsToDebug(logging.Filter):
    """urllib3 logs every retry as a WARNING (``Retrying (Retry(total=2, ...)) after connection
    broken by ...``), three per unreachable catalog, without naming the marketplace; the caller
    reports the failure once, after the retries. These records are demoted to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Retrying"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _quiet_retry_warnings() -> None:
    pool_log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RetryWarningsToDebug) for f in pool_log.filters):
        pool_log.addFilter(_RetryWarningsToDebug())


_quiet_retry_warnings()


def describe_request_error(exc: requests.RequestException) -> str:
    """A short cause for a failed request (no URL repetition, no stack)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.ConnectionError):
        reason = str(exc)
        if "timed out" in reason:
            return "timed out"
        if "Connection refused" in reason:
            return "connection refused"
        if "Name or service not known" in reason or "NameResolutionError" in reason:
            return "host name not found"
        if "Max retries exceeded" in reason and "ResponseError" in reason:
            return "server errors after retries"
        if "Read timed out" in reason:
            return "timed out"
        return "connection failed"
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection closed before the end of the answer (truncated)"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "answer body could not be decompressed"
    return type(exc).__name__


class _BodyReadError(RemoteError):
    """The connection failed while the body was being received."""


@dataclass(frozen=True)
class Fetched:
    body: bytes
    from_cache: bool
    url: str


class CachedFetcher:
    """GET with validators remembered under ``cache_dir``; a 304 answer reuses the cached body."""

    def __init__(
        self,
        session: requests.Session,
        cache_dir: Path | None,
        connect_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        self.session = session
        self.cache_dir = cache_dir
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes = max_body_bytes

    def _timeouts(self) -> tuple[float, float]:
        connect = CONNECT_TIMEOUT_S if self.connect_timeout_s is None else self.connect_timeout_s
        read = READ_TIMEOUT_S if self.read_timeout_s is None else self.read_timeout_s
        return connect, read

    def _cache_path(self, url: str) -> Path | None:
        if self.cache_dir is None:
            return None
        ua = self.session.headers.get("User-Agent", "")
        key = hashlib.sha256(f"{cache_url(url)}\n{ua}".encode()).hexdigest()
        return self.cache_dir / f"{key}{CACHE_SUFFIX}"

    def _read_cache(self, path: Path | None) -> tuple[dict, bytes] | None:
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                meta = json.loads(f.readline())
                body = f.read()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("length") != len(body):
            return None
        return meta, body

    def _write_cache(self, path: Path | None, meta: dict, body: bytes) -> None:
        if path is None:
            return
        meta = {**meta, "length": len(body)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep_temps(path.parent, UNIQUE_PREFIX, CACHE_SUFFIX, max_age_s=STALE_TMP_S)
            with atomic_file(
                path, temp=unique_temp(path, suffix=CACHE_SUFFIX), mode=PRIVATE_FILE_MODE
            ) as f:
                f.write(json.dumps(meta).encode() + b"\n")
                f.write(body)
        except (OSError, StorageError):
            pass  # a cache that cannot be written only costs a full download next time

    def _drop_cache(self, path: Path | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def get(self, url: str, headers: dict[str, str] | None = None) -> Fetched:
        path = self._cache_path(url)
        cached = self._read_cache(path)
        req_headers = dict(headers or {})
        if cached:
            meta = cached[0]
            if meta.get("etag"):
                req_headers["If-None-Match"] = meta["etag"]
            if meta.get("last_modified"):
                req_headers["If-Modified-Since"] = meta["last_modified"]
        for attempt in range(BODY_RETRY_COUNT + 1):
            resp = self._request(url, req_headers)
            try:
                if resp.status_code == 304 and cached:
                    return Fetched(cached[1], True, url)
                if resp.status_code == 304:
                    resp.close()
                    resp = self._request(url, dict(headers or {}))
                if resp.status_code != 200:
                    reason = resp.reason or ""
                    raise RemoteError(
                        f"{display_url(url)} answered HTTP {resp.status_code} {reason}".rstrip()
                    )
                body = self._read_body(resp, url)
                break
            except _BodyReadError:
                # urllib3 retries failed requests, not an answer cut in the middle of its body
                if attempt == BODY_RETRY_COUNT:
                    raise
            finally:
                resp.close()
        meta = {
            "url": cache_url(url),
            "etag": resp.headers.get("ETag", ""),
            "last_modified": resp.headers.get("Last-Modified", ""),
        }
        if meta["etag"] or meta["last_modified"]:
            self._write_cache(path, meta, body)
        elif cached:
            self._drop_cache(path)  # its validators no longer describe what the server sends
        return Fetched(body, False, url)

    def _request(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(url, headers=headers, stream=True, timeout=self._timeouts())
        except requests.RequestException as exc:
            raise RemoteError(
                f"cannot fetch {display_url(url)}: {describe_request_error(exc)}"
            ) from None

    def _read_body(self, resp: requests.Response, url: str) -> bytes:
        limit = MAX_BODY_BYTES if self.max_body_bytes is None else self.max_body_bytes
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(BODY_CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    raise RemoteError(f"{display_url(url)} answered more than {limit} bytes")
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise _BodyReadError(
                f"download of {display_url(url)} failed: {describe_request_error(exc)}"
            ) from None
        return b"".join(chunks)


def decode_text(body: bytes) -> str:
    """A catalog body as text: UTF-8, a leading BOM dropped, invalid bytes as U+FFFD."""
    return body.decode("utf-8-sig", errors="replace")


def json_value_bound(body: bytes) -> int:
    """An upper bound on the number of JSON values in ``body``, without parsing it."""
    return 1 + sum(body.count(b) for b in JSON_VALUE_STARTS)


def json_int(text: str) -> int | float:
    """A JSON integer as ``json.loads`` reads it, except that one of more than MAX_INT_DIGITS
    digits becomes what its float spelling already gives (``1e5000``: a float, infinite past
    308 digits). ``int()`` raised ValueError past 4,300 digits, which failed the whole document
    for one bad field; a float is a value every entry check already handles (a size must be
    finite, a count an int), so only the entry holding it is refused."""
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        return float(text)
    return int(text)


def loads_bounded(body: bytes, url: str, max_values: int = DEFAULT_MAX_JSON_VALUES) -> object:
    """``body`` decoded as JSON (integers by :func:`json_int`); RemoteError if it is not JSON
    or may hold more than ``max_values`` values (checked before anything is built)."""
    if json_value_bound(body) > max_values:
        raise RemoteError(
            f"{display_url(url)} answered a JSON document of more than {max_values} values, "
            "far beyond any real catalog: refused (memory bound)"
        )
    try:
        return json.loads(decode_text(body), parse_int=json_int)
    except ValueError as exc:
        raise RemoteError(
            f"{display_url(url)} did not answer valid JSON ({exc.__class__.__name__})"
        ) from None
    except RecursionError:
        raise RemoteError(f"{display_url(url)} answered JSON nested too deeply") from None


def fetch_json(
    fetcher: CachedFetcher, url: str, max_values: int = DEFAULT_MAX_JSON_VALUES
) -> tuple[object, bool]:
    """GET ``url`` and decode JSON (bounded, lenient: see the module docstring); returns
    (document, from_cache)."""
    fetched = fetcher.get(url, {"Accept": "application/json"})
    return loads_bounded(fetched.body, url, max_values), fetched.from_cache
