"""Readers for IMPORT_SOURCE: a local path, ``ssh://host:/path``, http(s), anything else via the
stock datastore downloader. Each yields the bytes sequentially in chunks; nothing is buffered
beyond one chunk.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from .. import driverlog
from ..errors import SourceError, one_line
from ..installation import Installation

if TYPE_CHECKING:
    import requests

CHUNK_BYTES = 1 << 20
"""Read size for every source: 1 MiB keeps syscalls few and memory flat."""
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


@dataclass
class FileSource:
    stream: IO[bytes]
    description: str
    size_bytes: int | None = None

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        try:
            return self.stream.read(n)
        except OSError as exc:
            raise SourceError(f"cannot read {self.description}: {exc.strerror or exc}") from None

    def readinto(self, buf: memoryview) -> int:
        """Read into ``buf`` (no intermediate chunk); 0 at the end."""
        try:
            return self.stream.readinto(buf) or 0
        except OSError as exc:
            raise SourceError(f"cannot read {self.description}: {exc.strerror or exc}") from None

    def fileno(self) -> int:
        """The descriptor, so a copier can skip the holes of a local sparse file."""
        return self.stream.fileno()


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
        data = self._out.read(n)
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
            self._err.seek(0, os.SEEK_END)
            self._err.seek(max(0, self._err.tell() - STDERR_TAIL_BYTES))
            err = one_line(self._err.read().decode("utf-8", "replace"), STDERR_TAIL_BYTES)
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


class HttpSource:
    def __init__(self, url: str, session: requests.Session | None = None) -> None:
        import requests  # only http sources pay for importing it

        self.description = url
        self._session = session or requests.Session()
        try:
            # Identity: the image's own bytes (what its MD5 covers), never a compressed form.
            self._resp = self._session.get(
                url,
                stream=True,
                timeout=(HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S),
                headers={"Accept-Encoding": "identity"},
            )
        except requests.RequestException as exc:
            raise SourceError(f"cannot download {url}: {type(exc).__name__}") from None
        if self._resp.status_code != 200:
            self._resp.close()
            raise SourceError(f"cannot download {url}: HTTP {self._resp.status_code}")
        length = self._resp.headers.get("Content-Length")
        encoded = self._resp.headers.get("Content-Encoding", "identity") != "identity"
        self.size_bytes = int(length) if length and length.isdigit() and not encoded else None
        self._decode = encoded
        self._raw = self._resp.raw

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        try:
            return self._raw.read(n, decode_content=self._decode)
        except Exception as exc:  # noqa: BLE001 - urllib3 raises many types for a dropped link
            raise SourceError(f"download of {self.description} failed: {exc}") from None

    def close(self) -> None:
        self._resp.close()


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
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme in ("", "file"):
        path = Path(source[len("file://") :] if scheme == "file" else source)
        try:
            stream = path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(stream.fileno())
            # Only a regular file has a meaningful size (a FIFO or a device reports 0).
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            yield FileSource(stream, str(path), size)
        finally:
            stream.close()
        return
    if scheme in ("http", "https"):
        src = HttpSource(source)
        try:
            yield src
        finally:
            src.close()
        return
    if scheme == "ssh":
        host, path = parse_ssh_source(source)
        argv = ssh_argv(host, f"cat -- {shlex.quote(path)}")
        proc_src = ProcessSource(argv, source)
        try:
            yield proc_src
        finally:
            proc_src.close()
        return
    downloader = (installation or Installation.detect()).stock_downloader()
    if downloader is None:
        raise SourceError(
            f"cannot read sources of scheme '{scheme}': the stock datastore downloader.sh "
            "is not installed"
        )
    proc_src = ProcessSource([str(downloader), source, "-"], source)
    try:
        yield proc_src
    finally:
        proc_src.close()
