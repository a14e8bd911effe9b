"""Readers for IMPORT_SOURCE: a local path, ``ssh://host:/path``, http(s), anything else via the
stock datastore downloader. Each yields the bytes sequentially in chunks; nothing is buffered
beyond one chunk.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from .. import driverlog
from ..errors import ChecksumError, RemoteError, SourceError, StorageError, one_line
from ..installation import Installation
from ..location import split_url
from ..units import parse_int

if TYPE_CHECKING:
    import requests

CHUNK_BYTES = 1 << 20
"""Read size for every source: 1 MiB keeps syscalls few and memory flat."""
SIGNAL_POLL_S = 0.5
"""Longest wait in one piece for a pipe's next bytes (see :func:`read_pipe`): how late a stop
signal that lands just before a read can be acted on."""
SIGNAL_POLL_MS = int(SIGNAL_POLL_S * 1000)
PROCESS_EXIT_TIMEOUT_S = 30
"""Time a reader process gets to exit once it has closed its output."""
ERROR_CHARS = 300
"""Characters of a failed reader's stderr quoted in the error, the last ones."""
STDERR_TAIL_BYTES = 4096
"""End of a failed reader's stderr kept for the error message (the cause is usually last)."""
HTTP_CONNECT_TIMEOUT_S = 15
HTTP_READ_TIMEOUT_S = 120
SSH_CONNECT_TIMEOUT_S = 15
SSH_CONFIG_ENV = "ONE_MARKET_SSH_CONFIG"
"""Environment variable naming an ssh_config file passed as ``ssh -F`` (tests, odd setups)."""
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
    "-o", "ServerAliveInterval=15",
    "-o", "ServerAliveCountMax=4",
)  # fmt: skip


def ssh_argv(host: str, command: str) -> list[str]:
    """``ssh`` argv running ``command`` on ``host`` without a terminal, never prompting."""
    argv = ["ssh"]
    config = os.environ.get(SSH_CONFIG_ENV, "")
    if config:
        argv += ["-F", config]
    return [*argv, *SSH_OPTIONS, "-T", host, command]


class Source(Protocol):
    """A readable image: ``read(n)`` returns up to n bytes, ``b""`` at the end."""

    description: str
    size_bytes: int | None

    def read(self, n: int = CHUNK_BYTES) -> bytes: ...


def read_pipe(fd: int, n: int) -> bytes:
    """``n`` bytes from a pipe, FIFO or socket, fewer only at its end (b"" then), as a
    buffered read gives them. A stop signal landing just before a blocking ``read()`` does not
    interrupt it, and Python runs handlers only between bytecodes, so a silent writer kept the
    process from stopping (transfer/interrupt): each wait is at most SIGNAL_POLL_S, and the
    loop goes on as long as the writer stays silent, as the blocking read did (the action's
    time limit, a SIGTERM, ends it)."""
    parts: list[bytes] = []
    got = 0
    poller = select.poll()  # not select(): it refuses descriptors past 1023
    poller.register(fd, select.POLLIN)
    while got < n:
        if not poller.poll(SIGNAL_POLL_MS):
            continue  # a pending signal's handler runs here, between two waits
        data = os.read(fd, n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


@dataclass
class FileSource:
    stream: IO[bytes]
    description: str
    size_bytes: int | None = None

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        try:
            if self.size_bytes is None:  # not a regular file: a pipe, FIFO or device
                return read_pipe(self.stream.fileno(), n)
            return self.stream.read(n)
        except OSError as exc:
            raise SourceError(f"cannot read {self.description}: {exc.strerror or exc}") from None

    def fileno(self) -> int:
        """The descriptor, so a copier can skip the holes of a local sparse file."""
        return self.stream.fileno()


def tail_lines(data: bytes, limit: int) -> bytes:
    """The last ``limit`` bytes of a helper's output (the cause of a failure is last), from
    the start of a line when cut: half a URL would no longer show the masking its password."""
    return data if len(data) <= limit else _from_a_line(data[-limit:])


def file_tail(f: IO[bytes], limit: int) -> bytes:
    """:func:`tail_lines` of a helper's output file, reading only the tail."""
    f.flush()
    start = max(0, os.fstat(f.fileno()).st_size - limit)
    f.seek(start)
    data = f.read()
    return data if start == 0 else _from_a_line(data)


def _from_a_line(cut: bytes) -> bytes:
    return cut.split(b"\n", 1)[1] if b"\n" in cut else cut


class ProcessSource:
    """Bytes from a helper process's stdout; its failure becomes a SourceError.

    The helper's stderr goes to an anonymous temporary file, not a pipe: a helper that writes a
    lot there (the stock downloader, ssh) can never block on a pipe nobody reads yet.
    """

    def __init__(self, argv: list[str], description: str, size_bytes: int | None = None) -> None:
        self.description = description
        self.size_bytes = size_bytes
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._err,
                start_new_session=False,
            )
        except OSError as exc:
            self._err.close()
            raise SourceError(f"cannot start {argv[0]} to read {description}: {exc}") from None
        assert self.proc.stdout is not None
        self._out = self.proc.stdout

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        data = read_pipe(self._out.fileno(), n)
        if not data:
            self._check()
        return data

    def _check(self) -> None:
        try:
            rc = self.proc.wait(PROCESS_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SourceError(
                f"cannot read {self.description}: the reader closed its output but did not exit"
            ) from None
        if rc != 0:
            tail = file_tail(self._err, STDERR_TAIL_BYTES).decode("utf-8", "replace")
            err = one_line(tail, STDERR_TAIL_BYTES)
            if len(err) > ERROR_CHARS:
                err = "..." + err[-(ERROR_CHARS - 3) :]
            raise SourceError(f"cannot read {self.description}: {err or f'exit status {rc}'}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()


def parse_ssh_source(source: str) -> tuple[str, str]:
    """``ssh://host:/path`` (or ``ssh://host/path``) -> (host, path)."""
    rest = source[len("ssh://") :]
    host, sep, path = rest.partition(":")
    if not sep:
        host, sep, path = rest.partition("/")
        path = "/" + path
    if not host or host.startswith("-") or not path.startswith("/"):
        raise SourceError(f"cannot understand ssh source {source!r}")
    return host, path


@contextmanager
def open_source(source: str, installation: Installation | None = None) -> Iterator[Source]:
    """Open IMPORT_SOURCE for sequential reading; always closed on exit."""
    driverlog.redact_url(source)  # credentials in a source URL stay out of every message
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme in ("file", "http", "https", "ssh"):  # others go to downloader.sh as they are
        split_url(source, "IMPORT_SOURCE", SourceError)
    if scheme in ("", "file"):
        path = Path(source[len("file://") :] if scheme == "file" else source)
        try:
            stream = path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from None
        with stream:
            st = os.fstat(stream.fileno())
            # Only a regular file has a meaningful size (a FIFO or a device reports 0).
            yield FileSource(stream, str(path), st.st_size if stat.S_ISREG(st.st_mode) else None)
        return
    opened: HttpSource | ProcessSource
    if scheme in ("http", "https"):
        opened = HttpSource(source)
    elif scheme == "ssh":
        host, path = parse_ssh_source(source)
        opened = ProcessSource(ssh_argv(host, f"cat -- {shlex.quote(path)}"), source)
    else:
        downloader = (installation or Installation.detect()).stock_downloader()
        if downloader is None:
            raise SourceError(
                f"cannot read sources of scheme '{scheme}': the stock datastore downloader.sh "
                "is not installed"
            )
        opened = ProcessSource([str(downloader), source, "-"], source)
    with contextlib.closing(opened):
        yield opened


# --------------------------------------------------------------------------------------------
# Ranged sources resumed after a dropped connection (the s3:// and lxd:// downloads)

RESUME_ATTEMPTS = 5
"""Ranged resumes after dropped connections, per download (``-o`` disables them); the client's
own retries cover each request before the body starts flowing."""
RESUME_DELAY_S = 1.0
"""Wait before the first resume, doubled at each further one (1+2+4+8+16 s at most)."""


class Body(Protocol):
    """A response body: ``read(n)`` up to n bytes, ``b""`` at the end."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


def stream_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """Exceptions meaning the connection broke while a body was streaming (urllib3's and the
    standard library's: all an :class:`HttpBody` raises), plus the client's own ``extra``."""
    import http.client

    from urllib3 import exceptions as uexc

    base = (uexc.ProtocolError, uexc.ReadTimeoutError, http.client.IncompleteRead)
    return (*extra, *base, ConnectionError, TimeoutError)


def s3_stream_errors() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as bexc

    return stream_errors(
        bexc.ResponseStreamingError,
        bexc.IncompleteReadError,
        bexc.ReadTimeoutError,
        bexc.ConnectionError,
        bexc.EndpointConnectionError,
        bexc.ConnectionClosedError,
    )


class ResumingReader:
    """A :class:`Source` of ``size`` bytes; a broken connection is resumed at the offset reached.

    ``open_at(offset)`` starts a GET of the bytes from ``offset`` to the end
    (:meth:`HttpSource.open_at`, :class:`S3Range`); ``body``, when given, is a first answer's
    body (from offset 0). A body that ends before ``size`` bytes counts as broken too. At most
    ``attempts`` resumes are made.
    """

    def __init__(
        self,
        open_at: Callable[[int], Body],
        size: int,
        what: str,
        attempts: int = RESUME_ATTEMPTS,
        delay_s: float = RESUME_DELAY_S,
        resumable: tuple[type[BaseException], ...] | None = None,
        body: Body | None = None,
    ) -> None:
        self._open_at = open_at
        self.size = self.size_bytes = size
        self.what = self.description = what
        self.attempts_left = attempts
        self.resumes = 0
        self._delay_s = delay_s
        self._resumable = resumable if resumable is not None else stream_errors()
        self._body = body
        self.offset = 0

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        while self.offset < self.size:
            try:
                if self._body is None:
                    self._body = self._open_at(self.offset)
                data = self._body.read(min(n, self.size - self.offset))
            except self._resumable as exc:
                self._broken(type(exc).__name__)
                continue
            if not data:
                self._broken("connection closed early")
                continue
            self.offset += len(data)
            return data
        return b""

    def _broken(self, reason: str) -> None:
        self.close()
        if self.attempts_left <= 0:
            raise RemoteError(
                f"{self.what}: connection lost at byte {self.offset} of {self.size} ({reason})"
                + (f" after {self.resumes} resumes" if self.resumes else "")
            )
        self.attempts_left -= 1
        delay = self._delay_s * (2**self.resumes)
        self.resumes += 1
        driverlog.warn(
            f"{self.what}: connection lost at byte {self.offset} of {self.size} ({reason}), "
            f"resuming in {delay:g} s"
        )
        time.sleep(delay)

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            # closing a broken connection may fail any way
            with contextlib.suppress(Exception):
                body.close()


class HttpSource:
    """An http(s) file: a :class:`Source` from its first byte, and ``open_at(offset)`` for
    :class:`ResumingReader` (ranged GETs pinned to the first answer's ETag/Last-Modified,
    refusing an answer that does not start at the byte asked).

    The first GET is made here. The bytes asked for are the file's own (``Accept-Encoding:
    identity``: what its checksum covers); a server that encodes them anyway is decoded, and the
    size is then unknown. ``size``, when known (a catalog's), is checked against each answer.
    A failed request is a SourceError (the bytes cannot be read), a wrong size a ChecksumError.
    """

    def __init__(
        self,
        url: str,
        session: requests.Session | None = None,
        *,
        size: int | None = None,
        timeouts: tuple[float, float] = (HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S),
    ) -> None:
        import requests  # only http sources pay for importing it

        self.url = self.description = url
        self.session = session or requests.Session()
        self.size = size
        self.timeouts = timeouts
        self.validator = ""
        self.body = self.open_at(0)
        self.size_bytes = self.body.size_bytes

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        try:
            return self.body.read(n)
        except Exception as exc:  # noqa: BLE001 - urllib3 raises many types for a dropped link
            raise SourceError(f"download of {self.description} failed: {exc}") from None

    def close(self) -> None:
        self.body.close()

    def open_at(self, offset: int) -> HttpBody:
        import requests

        from ..web import describe_request_error

        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        try:
            resp = self.session.get(self.url, headers=headers, stream=True, timeout=self.timeouts)
        except requests.RequestException as exc:
            raise SourceError(f"cannot fetch {self.url}: {describe_request_error(exc)}") from None
        expected = 206 if offset else 200
        if resp.status_code != expected:
            resp.close()
            if resp.status_code == 404:
                raise SourceError(f"{self.url}: no such file on the server (HTTP 404)")
            if resp.status_code == 416:
                raise ChecksumError(
                    f"{self.url}: the file on the server ends at byte {offset}, before the "
                    "size the catalog gives (truncated)"
                )
            if offset and resp.status_code == 200:
                raise SourceError(
                    f"{self.url}: the server ignored the range asked to resume at byte {offset}"
                )
            raise SourceError(f"{self.url} answered HTTP {resp.status_code} {resp.reason or ''}")
        if offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            resp.close()
            raise SourceError(f"{self.url}: resume answer does not start at byte {offset}")
        if not offset:
            self.validator = resp.headers.get("ETag", "") or resp.headers.get("Last-Modified", "")
        body = HttpBody(resp)
        if self.size is not None and body.size_bytes not in (None, self.size - offset):
            body.close()
            raise ChecksumError(
                f"{self.url}: the server's file is {offset + (body.size_bytes or 0)} bytes, the "
                f"catalog says {self.size} (truncated or replaced)"
            )
        return body


def _content_length(text: str) -> int | None:
    """A Content-Length, or None when absent or not a plain count (a 5,000-digit one included:
    urllib3 ignores it too, then the copy counts the bytes)."""
    if text[:1] in ("+", "-"):
        return None
    try:
        return parse_int(text)
    except ValueError:
        return None


class HttpBody:
    """A streamed answer's bytes, decoded only when the server encoded them despite
    ``identity``; ``size_bytes`` from Content-Length, None when absent or encoded."""

    def __init__(self, resp: requests.Response) -> None:
        self._resp = resp
        length = resp.headers.get("Content-Length", "")
        self._decode = resp.headers.get("Content-Encoding", "identity") != "identity"
        self.size_bytes = None if self._decode else _content_length(length)

    def read(self, n: int) -> bytes:
        return self._resp.raw.read(n, decode_content=self._decode)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._resp.close()


class S3Range:
    """``open_at(offset)`` for :class:`ResumingReader` over one S3 object: GETs pinned to the
    first answer's ETag (an object replaced meanwhile fails), resumes checked to start at the
    byte asked. :meth:`first` makes the first GET and keeps its answer (size, metadata)."""

    def __init__(self, client: Any, bucket: str, key: str, what: str, where: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.what, self.where = what, where
        self.etag = ""

    def first(self) -> dict[str, Any]:
        from botocore import exceptions as bexc

        from .. import s3config

        try:
            answer = self._get(0)
        except (bexc.BotoCoreError, OSError) as exc:
            raise s3config.s3_error(exc, self.what, self.where) from None
        if answer.get("ContentLength") is None:
            answer["Body"].close()
            raise RemoteError(
                f"{self.what}: S3 at {self.where} sent no Content-Length for the object"
            )
        self.etag = str(answer.get("ETag") or "")
        return answer

    def __call__(self, offset: int) -> Body:
        answer = self._get(offset)
        if not str(answer.get("ContentRange") or "").startswith(f"bytes {offset}-"):
            # bytes from elsewhere would be spliced in silently when no checksum is known
            answer["Body"].close()
            raise RemoteError(
                f"{self.what}: S3 at {self.where} ignored the range asked to resume at byte "
                f"{offset}"
            )
        return answer["Body"]

    def _get(self, offset: int) -> dict[str, Any]:
        from botocore import exceptions as bexc

        from .. import s3config

        args: dict[str, str] = {"Bucket": self.bucket, "Key": self.key}
        if self.etag:
            args["IfMatch"] = self.etag
        if offset:
            args["Range"] = f"bytes={offset}-"
        try:
            return self.client.get_object(**args)
        except bexc.ClientError as exc:
            if s3config.is_missing(exc):
                missing = (
                    "bucket" if s3config.client_error_code(exc) == "NoSuchBucket" else "object"
                )
                raise StorageError(
                    f"{self.what}: no such {missing} on S3 at {self.where}"
                ) from None
            if s3config.is_precondition_failed(exc):
                raise RemoteError(
                    f"{self.what}: the object changed on S3 during the download"
                ) from None
            raise s3config.s3_error(exc, self.what, self.where) from None
