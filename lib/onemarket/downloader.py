"""The datastore downloader: ``s3://`` read with boto3, ``lxd://`` container disks built here,
every other source handed over.

oned exports a marketplace app into a datastore by running the datastore's ``cp`` action, which
calls ``remotes/datastore/downloader.sh [options] FROM TO`` with the datastore action document
(``<DS_DRIVER_ACTION_DATA>`` holding IMAGE, DATASTORE and, for an export, the MARKETPLACE with its
credentials) base64-encoded in the ``DRV_ACTION`` environment variable. Ceph RGW answers the
stock script's hand-signed curl requests with 403 SignatureDoesNotMatch, so install.sh puts a
wrapper running this module in its place and keeps the original as ``downloader.sh.orig``.

- ``s3://`` sources are read here: a streaming GET with bounded memory, resumed with a ranged GET
  (pinned to the object's ETag) after a dropped connection, the md5/sha256 our importer stores in
  the object's metadata verified on the fly, and the stock script's options honoured (hash of the
  downloaded bytes, gzip/bzip2/xz decompression unless ``-n``, ``-c`` first bytes, tar/zip
  unpacked when TO is a path, ``-l`` rate limit, ``-o`` no retries).
- ``lxd://<ENDPOINT><path>?size=&filesystem=&format=`` (Linux Containers apps) replaces the stock
  ``lxd_downloader.sh``: the rootfs is found in the server's catalog and checked against its
  sha256 and size, the disk is built without root and the context package added
  (:mod:`lxdsource`, :mod:`containerdisk`, :mod:`contextpkg`, :mod:`contextroot`).
- Any other source execs the original script with the same arguments, environment and stdin, so
  nothing changes for any datastore.

A failure is an ``ERROR:`` line plus, on OpenNebula 7.x, its cause unprefixed, the line oned
keeps for the image's error message (:func:`report_failure`). SIGTERM, SIGINT and SIGHUP unwind
(:mod:`transfer.interrupt`), removing partial files; what a SIGKILLed run left is removed by the
next run on the same host (:func:`remove_stale_leftovers`).
"""

from __future__ import annotations

import bz2
import contextlib
import getopt
import hashlib
import lzma
import os
import re
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote

from . import driverlog
from .errors import (
    ChecksumError,
    ConfigError,
    MarketError,
    PayloadError,
    RemoteError,
    SourceError,
    StorageError,
    from_os_error,
    one_line,
)

EXIT_FAILURE = 255
"""Exit status of every failure (the stock script exits -1, seen by callers as 255)."""

STOCK_ENV = "ONE_MARKET_STOCK_DOWNLOADER"
"""Environment variable naming the original downloader (tests, unusual layouts)."""
WRAPPER_MARKER = b"onemarket"
"""Marker install.sh writes in its wrappers: a script carrying it is ours, never the original."""
WRAPPER_PROBE_BYTES = 512
"""Head of a candidate original read to look for the marker (only the first lines matter)."""

CHUNK_BYTES = 1 << 20
"""Bytes asked of the network per read, and the most a decompressor emits per call: memory holds
a few such chunks whatever the object size (about 4 MiB in all)."""
WRITE_BUFFER_BYTES = 1 << 20
"""Buffer of the destination file or stdout (one chunk)."""
SNIFF_BYTES = 512
"""Head of the downloaded stream kept to recognise compression, and of the decompressed stream
to recognise tar (magic at offset 257) and zip archives."""
MIN_THROTTLED_READ_BYTES = 16 * 1024
"""Smallest read under ``-l``, so a low rate still sleeps in short, even steps."""

RESUME_ATTEMPTS = 5
"""Ranged resumes after dropped connections, per download (``-o`` disables them); botocore's own
retries (``s3config.MAX_ATTEMPTS``) cover each request before the body starts flowing."""
RESUME_DELAY_S = 1.0
"""Wait before the first resume, doubled at each further one (1+2+4+8+16 s at most)."""

DRV_ACTION_ENV = "DRV_ACTION"

GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC_RE = re.compile(rb"BZh[1-9]")
XZ_MAGIC = b"\xfd7zXZ\x00"
TAR_MAGIC_OFFSET = 257
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

_SHORT_OPTS = "m:s:l:c:no"
_LONG_OPTS = ["md5=", "sha1=", "limit=", "max-size=", "nodecomp", "noretry"]
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:/s)?")
_SIZE_RE = re.compile(r"(\d+)\s*(b|[kKmMgGtT](?:iB|B)?)?")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


class UsageError(MarketError):
    """The command line is not one the stock downloader would accept."""


@dataclass(frozen=True)
class Options:
    """The stock downloader's command line, parsed."""

    source: str
    dest: str
    hashes: tuple[tuple[str, str], ...] = ()
    """(algorithm, expected hex) from ``-m``/``-s``. The datastore scripts pass both when the
    image has both; the stock script checks only the last one given, this one checks each."""
    nodecomp: bool = False
    limit_bps: float | None = None
    max_size: int | None = None
    noretry: bool = False

    @property
    def to_stdout(self) -> bool:
        return self.dest == "-"


def parse_rate(text: str) -> float:
    """Bytes per second from a curl ``--limit-rate`` value (``500k``, ``10M``, ``1G``)."""
    m = _RATE_RE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"invalid --limit rate {text!r} (bytes per second, suffix k, m or g)")
    return float(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes from a ``head -c`` count (``4096``, ``10K``, ``1MB``, ``2MiB``)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid --max-size {text!r} (a number of bytes)")
    suffix = m.group(2) or ""
    if suffix == "b":
        return int(m.group(1)) * 512
    base = 1000 if suffix.endswith("B") and not suffix.endswith("iB") else 1024
    return int(m.group(1)) * base ** _POWERS[suffix[:1].lower()]


def parse_args(argv: list[str]) -> Options:
    """Parse the stock downloader's options (GNU getopt: options may follow FROM and TO)."""
    try:
        opts, args = getopt.gnu_getopt(argv, _SHORT_OPTS, _LONG_OPTS)
    except getopt.GetoptError as exc:
        raise UsageError(f"Arguments error: {exc}") from None
    values: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    for name, value in opts:
        if name in ("-m", "--md5"):
            hashes["md5"] = value.strip().lower()
        elif name in ("-s", "--sha1"):
            hashes["sha1"] = value.strip().lower()
        elif name in ("-n", "--nodecomp"):
            values["nodecomp"] = True
        elif name in ("-l", "--limit"):
            values["limit_bps"] = parse_rate(value)
        elif name in ("-c", "--max-size"):
            values["max_size"] = parse_size(value)
        elif name in ("-o", "--noretry"):
            values["noretry"] = True
    if len(args) < 2 or not args[0] or not args[1]:
        raise UsageError("Arguments error: usage: downloader.sh [options] FROM TO")
    if hashes and values.get("max_size") is not None:
        raise UsageError("Hash check not supported for partial downloads")
    return Options(source=args[0], dest=args[1], hashes=tuple(hashes.items()), **values)


OUR_SCHEMES = ("s3://", "lxd://")
"""Sources read here; every other one goes to the original script."""


def request_scheme(argv: list[str]) -> str | None:
    """``s3://`` or ``lxd://`` when this command line's FROM is ours, else None.

    Anything else, a command line getopt rejects included, goes to the original script
    untouched (it prints its own error), unless one of its words names one of our sources
    (then our own one-line usage error is clearer than the stock script's).
    """
    try:
        _, args = getopt.gnu_getopt(argv, _SHORT_OPTS, _LONG_OPTS)
    except getopt.GetoptError:
        args = argv
        words = [a for a in argv if a.startswith(OUR_SCHEMES)]
        return next(s for s in OUR_SCHEMES if words[0].startswith(s)) if words else None
    if not args:
        return None
    return next((s for s in OUR_SCHEMES if args[0].startswith(s)), None)


def is_s3_request(argv: list[str]) -> bool:
    """Whether this command line is an ``s3://`` download."""
    return request_scheme(argv) == "s3://"


# --------------------------------------------------------------------------------------------
# Handing a source over to the original script


def find_stock_downloader(environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """The original downloader.sh: the env override, else the installation's ``.orig``.

    A script carrying install.sh's marker is our own wrapper and is never returned (running it
    would loop back here).
    """
    override = environ.get(STOCK_ENV, "").strip()
    if override:
        candidates = [Path(override)]
    else:
        from .installation import Installation

        found = Installation.detect(dict(environ)).stock_downloader()
        candidates = [found] if found is not None else []
    for path in candidates:
        try:
            with open(path, "rb") as fh:
                head = fh.read(WRAPPER_PROBE_BYTES)
        except OSError:
            continue
        if WRAPPER_MARKER in head or not os.access(path, os.X_OK):
            continue
        return path
    return None


def original_environ() -> dict[bytes, bytes] | None:
    """The environment exactly as this process received it, from ``/proc/self/environ``.

    The interpreter may have added variables at start-up (PEP 538 sets ``LC_CTYPE=C.UTF-8``
    under the C locale), which must not reach the original script. None when unavailable.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[name] = value
    return env


def exec_stock(argv: list[str]) -> int:
    """Replace this process with the original script run on ``argv`` (the arguments after it).

    The interpreter ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: they are set
    back to their defaults, because the stock script's partial reads (``-c``) rely on SIGPIPE.
    """
    stock = find_stock_downloader(os.environ)
    if stock is None:
        report_failure(
            "the stock datastore downloader (downloader.sh.orig) is not installed, so this "
            f"source cannot be downloaded; set {STOCK_ENV} or reinstall OpenNebula's datastore "
            "remotes"
        )
        return EXIT_FAILURE
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    env = original_environ()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if env is None:
            os.execv(stock, [str(stock), *argv])
        else:
            os.execve(stock, [os.fsencode(stock), *map(os.fsencode, argv)], env)
    except OSError as exc:
        report_failure(f"cannot run the stock downloader {stock}: {exc.strerror or exc}")
    return EXIT_FAILURE


# --------------------------------------------------------------------------------------------
# Stream stages: resuming reader, rate limit, digests, decompression, destination


class Body(Protocol):
    """A response body: ``read(n)`` up to n bytes, ``b""`` at the end."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


def _resumable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning the connection broke while the body was streaming."""
    import http.client

    from botocore import exceptions as bexc
    from urllib3 import exceptions as uexc

    return (
        bexc.ResponseStreamingError,
        bexc.IncompleteReadError,
        bexc.ReadTimeoutError,
        bexc.ConnectionError,
        bexc.EndpointConnectionError,
        bexc.ConnectionClosedError,
        uexc.ProtocolError,
        uexc.ReadTimeoutError,
        http.client.IncompleteRead,
        ConnectionError,
        TimeoutError,
    )


class ResumingReader:
    """The object's bytes in order; a broken connection is resumed at the offset reached.

    ``body`` is the first response's body (from offset 0); ``open_at(offset)`` starts a GET of
    the bytes from ``offset`` to the end. A body that ends before ``size`` bytes counts as
    broken too. At most ``attempts`` resumes are made.
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
        self.size = size
        self.what = what
        self.attempts_left = attempts
        self.resumes = 0
        self._delay_s = delay_s
        self._resumable = resumable if resumable is not None else _resumable_errors()
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


class RateLimiter:
    """Keeps the average rate at or below ``bps`` bytes per second by sleeping."""

    def __init__(self, bps: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bps = bps
        self._clock = clock
        self._start = clock()
        self._bytes = 0

    @property
    def read_size(self) -> int:
        """Reads of about a quarter second's worth of bytes, so sleeps stay short."""
        return max(MIN_THROTTLED_READ_BYTES, min(CHUNK_BYTES, int(self.bps / 4)))

    def consumed(self, n: int) -> None:
        self._bytes += n
        ahead = self._bytes / self.bps - (self._clock() - self._start)
        if ahead > 0:
            time.sleep(ahead)


def detect_compression(head: bytes) -> str | None:
    """``gzip``, ``bzip2`` or ``xz`` when ``head`` starts with that format's magic."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if BZIP2_MAGIC_RE.match(head):
        return "bzip2"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return None


def detect_archive(head: bytes) -> str | None:
    """``tar`` (POSIX or GNU ustar header) or ``zip`` when ``head`` starts such an archive."""
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    return None


class Decompressor:
    """Streaming decompression of concatenated gzip/bzip2/xz members, bounded output per call.

    Like gunzip, bunzip2 and unxz, a stream made of several members is decompressed whole and
    NUL padding between or after members is skipped; bytes after a member that do not start
    another one are corrupt data; a stream that ends inside a member is truncated.
    """

    def __init__(self, kind: str, what: str) -> None:
        self.kind = kind
        self.what = what
        self._dec: Any = self._new()

    def _new(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed chunks (each at most CHUNK_BYTES) for the next compressed bytes."""
        while True:
            if self._dec is None:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._dec = self._new()
            try:
                if self.kind == "gzip":
                    out = self._dec.decompress(data, CHUNK_BYTES)
                    data = self._dec.unconsumed_tail
                    more = bool(data)
                else:
                    out = self._dec.decompress(data, max_length=CHUNK_BYTES)
                    data = b""
                    more = not self._dec.eof and not self._dec.needs_input
            except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
                raise SourceError(f"{self.what}: corrupt {self.kind} data ({exc})") from None
            if out:
                yield out
            if self._dec.eof:
                data = self._dec.unused_data + data
                self._dec = None
                continue
            if not more:
                return

    def finish(self) -> None:
        """Fail when the compressed stream ended inside a member."""
        if self._dec is not None:
            raise SourceError(f"{self.what}: {self.kind} data is truncated")


class Checks:
    """Digests of the downloaded bytes, compared with the object's metadata and ``-m``/``-s``."""

    def __init__(self, what: str, opts: Options, meta_md5: str, meta_sha256: str) -> None:
        self.what = what
        self.expected: list[tuple[str, str, str]] = []
        for name, value in opts.hashes:
            self.expected.append((name, value, f"--{name}"))
        if meta_md5:
            self.expected.append(("md5", meta_md5.strip().lower(), "object metadata md5"))
        if meta_sha256:
            self.expected.append(("sha256", meta_sha256.strip().lower(), "object metadata sha256"))
        self._hashers = {
            name: hashlib.new(name, usedforsecurity=False) for name, _, _ in self.expected
        }

    def update(self, data: bytes) -> None:
        for h in self._hashers.values():
            h.update(data)

    def verify(self) -> None:
        for name, expected, origin in self.expected:
            got = self._hashers[name].hexdigest()
            if got != expected:
                raise ChecksumError(
                    f"{self.what}: {name.upper()} mismatch ({origin} {expected}, downloaded {got})"
                )


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self, unpack: bool) -> None: ...

    def abort(self) -> None: ...


class StdoutSink:
    """Data to fd 1, nothing else ever written there."""

    def __init__(self) -> None:
        self._out = open(1, "wb", buffering=WRITE_BUFFER_BYTES, closefd=False)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        try:
            self._out.write(data)
        except BrokenPipeError:
            raise StorageError("standard output closed by its reader") from None
        except OSError as exc:
            raise from_os_error(exc, "writing to standard output") from None

    def commit(self, unpack: bool) -> None:
        try:
            self._out.flush()
        except BrokenPipeError:
            raise StorageError("standard output closed by its reader") from None
        except OSError as exc:
            raise from_os_error(exc, "writing to standard output") from None

    def abort(self) -> None:
        """Flush what can be; when the reader is gone, point fd 1 at /dev/null so that no later
        flush (the interpreter's own at exit included) reports the broken pipe again."""
        try:
            self._out.flush()
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
            with contextlib.suppress(OSError):
                self._out.flush()


class FileSink:
    """A file path: written under a temporary name beside it, renamed into place when complete.

    On failure nothing is left at the destination (as the stock script, which truncates it at
    the start, a stale file there is removed too). An existing device or FIFO is written in place.
    Archives (tar, zip) are unpacked into a directory of that name, as the stock script does.
    """

    def __init__(self, dest: str, what: str) -> None:
        self.dest = Path(dest)
        self.what = what
        self._tmp: Path | None = None
        try:
            st = self.dest.stat()
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise from_os_error(exc, f"destination {dest}") from None
        if st is not None and self.dest.is_dir():
            raise StorageError(f"destination {dest} is a directory")
        self._in_place = st is not None and not self.dest.is_file()
        try:
            if self._in_place:
                self._fh: BinaryIO = open(self.dest, "wb", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115
            else:
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{self.dest.name}.{_owner_tag()}.",
                    suffix=".part",
                    dir=self.dest.parent,
                )
                self._tmp = Path(tmp)
                os.fchmod(fd, 0o666 & ~_umask())
                self._fh = os.fdopen(fd, "wb", buffering=WRITE_BUFFER_BYTES)
        except OSError as exc:
            raise from_os_error(exc, f"destination {dest}") from None

    def write(self, data: bytes) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            raise from_os_error(exc, f"writing {self.dest}") from None

    def commit(self, unpack: bool) -> None:
        try:
            self._fh.close()
        except OSError as exc:
            raise from_os_error(exc, f"writing {self.dest}") from None
        if self._tmp is None:
            return
        if unpack:
            kind = self._archive_kind()
            if kind is not None:
                self._unpack(kind)
                return
        try:
            os.replace(self._tmp, self.dest)
        except OSError as exc:
            raise from_os_error(exc, f"moving the download into {self.dest}") from None
        self._tmp = None

    def _archive_kind(self) -> str | None:
        assert self._tmp is not None
        with open(self._tmp, "rb") as fh:
            return detect_archive(fh.read(SNIFF_BYTES))

    def _unpack(self, kind: str) -> None:
        """Unpack into a fresh directory beside the destination, then put it in its place."""
        assert self._tmp is not None
        out = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=self.dest.parent))
        try:
            if kind == "tar":
                with tarfile.open(self._tmp, "r:") as tar:
                    tar.extractall(out, filter="data")
            else:
                with zipfile.ZipFile(self._tmp) as zf:
                    zf.extractall(out)
            os.chmod(out, 0o777 & ~_umask())
            if self.dest.is_file() or self.dest.is_symlink():
                self.dest.unlink()
            os.rename(out, self.dest)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, ValueError) as exc:
            shutil.rmtree(out, ignore_errors=True)
            raise StorageError(f"{self.what}: cannot unpack the {kind} archive ({exc})") from None
        self._tmp.unlink(missing_ok=True)
        self._tmp = None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
            try:
                if self.dest.is_file() and not self.dest.is_symlink():
                    self.dest.unlink()
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class CopyResult:
    raw_bytes: int
    out_bytes: int
    partial: bool


def copy_stream(
    reader: Any,
    sink: Sink,
    opts: Options,
    checks: Checks,
    what: str,
) -> CopyResult:
    """Raw bytes -> digests -> decompressor -> sink, one chunk at a time.

    With ``-c`` the copy stops once that many decompressed bytes are out (digests are then not
    compared: a partial read cannot be verified, which is why the stock script refuses -m/-s
    with -c). Otherwise every digest is compared at the end.
    """
    limiter = RateLimiter(opts.limit_bps) if opts.limit_bps else None
    read_size = limiter.read_size if limiter else CHUNK_BYTES
    head = b""
    while len(head) < SNIFF_BYTES:
        data = reader.read(read_size)
        if not data:
            break
        head += data
    kind = None if opts.nodecomp else detect_compression(head)
    decomp = Decompressor(kind, what) if kind else None
    limit = opts.max_size
    raw = out = 0
    data = head
    while data:
        raw += len(data)
        checks.update(data)
        if limiter:
            limiter.consumed(len(data))
        for piece in decomp.feed(data) if decomp else (data,):
            if limit is not None and out + len(piece) >= limit:
                sink.write(piece[: limit - out])
                return CopyResult(raw, limit, partial=True)
            sink.write(piece)
            out += len(piece)
        data = reader.read(read_size)
    if decomp:
        decomp.finish()
    checks.verify()
    return CopyResult(raw, out, partial=False)


# --------------------------------------------------------------------------------------------
# s3://


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, source: str) -> S3Location:
        """``s3://BUCKET/KEY``; the key may contain ``/`` (the stock script's basename rule
        only covers keys without one, which is all our importer writes)."""
        rest = source[len("s3://") :]
        bucket, _, key = rest.partition("/")
        key = unquote(key) if "%" in key else key
        if not bucket or not key or "\0" in key:
            raise UsageError(f"{source!r} is not an s3://BUCKET/KEY source")
        return cls(bucket, key)


def market_from_drv_action(environ: dict[str, str] | os._Environ[str]) -> Any:
    """The MARKETPLACE of the datastore action document in ``DRV_ACTION``, as a Market."""
    from .action import Market, decode_base64, parse_xml

    payload = environ.get(DRV_ACTION_ENV, "").strip()
    if not payload:
        raise ConfigError(
            f"{DRV_ACTION_ENV} is not set: an s3:// source needs the datastore action data "
            "with the MARKETPLACE (run by the datastore's cp action)"
        )
    root = parse_xml(decode_base64(payload), DRV_ACTION_ENV)
    market_el = root.find("MARKETPLACE")
    if market_el is None:
        raise PayloadError(
            f"{DRV_ACTION_ENV} <{root.tag}> has no MARKETPLACE: the s3:// source is not an app "
            "exported from an S3 marketplace"
        )
    return Market.from_element(market_el)


def _meta(metadata: dict[str, str], name: str) -> str:
    for k, v in metadata.items():
        if k.lower() == name:
            return v
    return ""


def download_s3(opts: Options, environ: dict[str, str] | os._Environ[str]) -> CopyResult:
    """Download ``opts.source`` from the market in DRV_ACTION to ``opts.dest``."""
    from botocore import exceptions as bexc

    from . import s3config

    loc = S3Location.parse(opts.source)
    what = f"download of {loc.url}"
    market = market_from_drv_action(environ)
    settings = s3config.S3Settings.from_market(market, need_bucket=False)
    where = settings.where
    overrides: dict[str, float | int] = {"max_pool_connections": 2}
    if opts.noretry:
        overrides["max_attempts"] = 1
    client = s3config.make_client(settings, **overrides)
    state: dict[str, str] = {}

    def get(offset: int) -> dict[str, Any]:
        args: dict[str, str] = {"Bucket": loc.bucket, "Key": loc.key}
        if state.get("etag"):
            args["IfMatch"] = state["etag"]
        if offset:
            args["Range"] = f"bytes={offset}-"
        try:
            return client.get_object(**args)
        except bexc.ClientError as exc:
            code = s3config.client_error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"{what}: no such object on S3 at {where}") from None
            if code == "NoSuchBucket":
                raise StorageError(f"{what}: no such bucket on S3 at {where}") from None
            if code in ("PreconditionFailed", "412"):
                raise RemoteError(f"{what}: the object changed on S3 during the download") from None
            raise s3config.s3_error(exc, what, where) from None

    def resume_at(offset: int) -> Body:
        answer = get(offset)
        if not str(answer.get("ContentRange") or "").startswith(f"bytes {offset}-"):
            # bytes from elsewhere would be spliced in silently when no checksum is known
            answer["Body"].close()
            raise RemoteError(
                f"{what}: S3 at {where} ignored the range asked to resume at byte {offset}"
            )
        return answer["Body"]

    try:
        first = get(0)
    except (bexc.BotoCoreError, OSError) as exc:
        raise s3config.s3_error(exc, what, where) from None
    if first.get("ContentLength") is None:
        first["Body"].close()
        raise RemoteError(f"{what}: S3 at {where} sent no Content-Length for the object")
    size = int(first["ContentLength"])
    state["etag"] = str(first.get("ETag") or "")
    metadata = first.get("Metadata") or {}
    checks = Checks(
        what,
        opts,
        _meta(metadata, s3config.METADATA_MD5),
        _meta(metadata, s3config.METADATA_SHA256),
    )
    reader = ResumingReader(
        resume_at,
        size,
        what,
        attempts=0 if opts.noretry else RESUME_ATTEMPTS,
        body=first["Body"],
    )
    try:
        sink: Sink = StdoutSink() if opts.to_stdout else FileSink(opts.dest, what)
    except BaseException:
        reader.close()
        raise
    try:
        try:
            result = copy_stream(reader, sink, opts, checks, what)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise s3config.s3_error(exc, what, where) from None
        finally:
            reader.close()
        sink.commit(unpack=not opts.nodecomp and not result.partial)
    except BaseException:
        sink.abort()
        raise
    return result


# --------------------------------------------------------------------------------------------
# lxd:// (Linux Containers apps): verified rootfs -> contextualized disk, built without root

LXD_WORKDIR_PREFIX = ".onemarket-lxd."
"""Work folder of one lxd:// download (rootfs, staging tree, image), beside the destination."""
DEFAULT_LXD_TMP = "/var/tmp"
"""Where the work folder goes when the image is written to standard output (as stock)."""


def _drv_action_market_attrs(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The MARKETPLACE attributes of DRV_ACTION when there are some (an lxd:// export works
    without them: the rootfs URL says where the catalog is)."""
    if not environ.get(DRV_ACTION_ENV, "").strip():
        return {}
    try:
        return dict(market_from_drv_action(environ).attrs)
    except MarketError as exc:
        driverlog.debug(f"lxd:// download without marketplace attributes: {exc}")
        return {}


def lxd_workdir(dest: str, environ: dict[str, str] | os._Environ[str]) -> Path:
    """A fresh work folder, on the destination's file system when the destination is a file
    (so the image is renamed into place, sparse, without a copy)."""
    if dest != "-" and not Path(dest).is_dir():
        parent = Path(dest).parent
    else:
        parent = Path(environ.get("TMPDIR") or DEFAULT_LXD_TMP)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{LXD_WORKDIR_PREFIX}{_owner_tag()}.", dir=parent))
    except OSError as exc:
        raise from_os_error(exc, f"work folder in {parent}") from None


def install_with_package_manager(
    helper: Path, built: Any, overlay: Any, workdir: Path, what: str
) -> None:
    """What the stock script does with its sudo rule: the package manager, in a chroot of the
    image, installs the context package with its dependencies and scripts."""
    from . import containerdisk, contextroot

    script = contextroot.commands(overlay.install_kind, overlay.package_in_image)
    terminal = "/bin/ash" if overlay.install_kind == "apk" else "/bin/sh"
    problem = contextroot.run_helper(helper, built.raw, workdir, script, terminal, what)
    containerdisk.set_root_owner(built.raw, built.root_uid, built.root_gid, what)
    if problem is None:
        driverlog.info(
            f"{what}: context package {overlay.package} installed by the package manager"
        )
        return
    driverlog.warn(
        f"{what}: installing context package {overlay.package} with the package manager through "
        f"sudo {helper} failed ({problem}): the image keeps its files unpacked without root, "
        f"without the dependencies {', '.join(overlay.skipped_depends) or 'it names'}"
    )


def deliver(image: Path, opts: Options, what: str) -> None:
    """The built image to the destination: renamed into place, or streamed (stdout, ``-c``,
    ``-m``/``-s`` checks, a device or FIFO destination)."""
    direct = (
        not opts.to_stdout
        and not opts.hashes
        and opts.max_size is None
        and not (Path(opts.dest).exists() and not Path(opts.dest).is_file())
    )
    if direct:
        try:
            os.chmod(image, 0o666 & ~_umask())
            os.replace(image, opts.dest)
        except OSError as exc:
            raise from_os_error(exc, f"moving the image into {opts.dest}") from None
        return
    checks = Checks(what, opts, "", "")
    sink: Sink = StdoutSink() if opts.to_stdout else FileSink(opts.dest, what)
    try:
        with open(image, "rb") as fh:
            copy_stream(fh, sink, replace(opts, nodecomp=True), checks, what)
        sink.commit(unpack=False)
    except BaseException:
        sink.abort()
        raise


def catalog_user_agent(attrs: dict[str, str], installation: Any) -> str:
    """The marketplace monitor's User-Agent, so the catalog answer it cached is reused (the
    cache is keyed by URL and agent)."""
    from .action import Market
    from .backends.base import Context
    from .catalogs.linuxcontainers import DRIVER, LinuxContainersCatalog

    market = Market(id=-1, name="lxd:// export", driver=DRIVER, attrs=dict(attrs))
    return LinuxContainersCatalog(market, Context(installation)).user_agent()


def download_lxd(opts: Options, environ: dict[str, str] | os._Environ[str]) -> None:
    """``lxd://<ENDPOINT><path>?size=&filesystem=&format=``: the rootfs found in its server's
    catalog, downloaded and checked (size, sha256), the OpenNebula context package added, the
    disk built without root and written to the destination."""
    from . import containerdisk, contextpkg, contextroot, lxdsource
    from .installation import Installation
    from .progress import Progress, log_progress
    from .web import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, CachedFetcher, fetch_json, make_session

    src = lxdsource.LxdSource.parse(opts.source)
    spec = containerdisk.DiskSpec(src.size_mb, src.filesystem, src.format)
    spec.check()
    if not opts.to_stdout and Path(opts.dest).is_dir():
        raise StorageError(f"destination {opts.dest} is a directory")
    attrs = _drv_action_market_attrs(environ)
    installation = Installation.detect(dict(environ))
    session = make_session(catalog_user_agent(attrs, installation))
    if opts.noretry:
        for adapter in session.adapters.values():
            adapter.max_retries.total = 0  # type: ignore[attr-defined]
    timeouts = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    try:
        fetcher = CachedFetcher(session, installation.cache_dir)
        rootfs = lxdsource.locate(
            src, lambda url: fetch_json(fetcher, url)[0], lxdsource.market_endpoint(attrs)
        )
        what = f"container {rootfs.distro} {rootfs.release} {rootfs.variant} ({rootfs.serial})"
        workdir = lxd_workdir(opts.dest, environ)
        try:
            tarball = workdir / f"rootfs.{lxdsource.rootfs_suffix(rootfs.path)}"
            driverlog.info(f"{what}: downloading {rootfs.url} ({rootfs.size} bytes)")
            reader = ResumingReader(
                lxdsource.HttpRange(session, rootfs.url, timeouts, rootfs.size),
                rootfs.size,
                f"download of {rootfs.url}",
                attempts=0 if opts.noretry else RESUME_ATTEMPTS,
                resumable=_http_resumable_errors(),
            )
            progress = Progress(rootfs.size, log_progress(f"{what}: download"))
            try:
                with open(tarball, "wb", buffering=WRITE_BUFFER_BYTES) as fh:
                    lxdsource.save_verified(reader, rootfs, fh, progress)
            except OSError as exc:
                raise from_os_error(exc, f"{what}: saving the rootfs in {workdir}") from None
            finally:
                reader.close()
            progress.finish()
            helper = contextroot.usable_helper(environ)
            overlay = contextpkg.build_overlay(
                rootfs.distro,
                rootfs.release,
                attrs,
                environ,
                session,
                workdir,
                timeouts,
                include_package_file=helper is not None,
            )
            layers = [(tarball, f"rootfs {rootfs.url}")]
            if overlay.tar is not None:
                layers.append((overlay.tar, f"context package {overlay.package}"))
            built = containerdisk.build(layers, spec, workdir, what)
            tarball.unlink()
            if overlay.package_in_image and helper is not None:
                install_with_package_manager(helper, built, overlay, workdir, what)
            elif overlay.skipped_depends:
                driverlog.warn(
                    f"{what}: context package {overlay.package} unpacked without the "
                    "distribution's package manager (that needs root, and sudo -n for "
                    f"{contextroot.helper_path(environ)} is not granted): its dependencies "
                    f"{', '.join(overlay.skipped_depends)} and its install scripts were "
                    "skipped, the container has only those its rootfs ships"
                )
            image = containerdisk.finish(built.raw, spec, what)
            deliver(image, opts, what)
            driverlog.info(f"{what}: {spec.format} disk of {spec.size_mb} MB written")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        session.close()


def _http_resumable_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import requests
    from urllib3 import exceptions as uexc

    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        uexc.ProtocolError,
        uexc.ReadTimeoutError,
        http.client.IncompleteRead,
        ConnectionError,
        TimeoutError,
    )


# --------------------------------------------------------------------------------------------
# Failure line and leftovers


def report_failure(message: str) -> None:
    """The failure as oned's datastore driver needs it to reach the image's error message.

    ``ERROR: <message>`` for oned.log, then, under OpenNebula 7.x, the message again without a
    prefix: the datastore ``cp`` script folds the first line of the downloader's stderr into its
    own ``ERROR: ... Command ... failed:`` log line (multiline_exec_and_log, one-7.0:
    src/mad/sh/scripts_common.sh:275-296), and 7.x's driver keeps out of the error message every
    line starting with ``ERROR:``/``INFO:``/``WARN:``/``DEBUG:``, joining the others
    (get_info_from_execution, one-7.0: src/mad/ruby/DriverExecHelper.rb:167-210), so only an
    unprefixed line after the first reaches ``oneimage show``. 6.10 puts all of stderr in the
    message (one-6.10: src/mad/ruby/CommandManager.rb:97-101), where the ERROR line suffices.
    The plain line ends with ``;``: the driver joins lines without a space, and its next one is
    the cp script's "Error copying ...". The same holds for every datastore whose ``cp`` runs the
    downloader through multiline_exec_and_log (fs/cp:159,179, ceph/cp:150 on one-7.0). The old
    ``ERROR MESSAGE --8<------`` block is parsed by neither release (only a stale spec,
    src/mad/ruby/test/OpenNebulaDriver_spec.rb:262, still mentions it).
    """
    from .installation import Installation

    driverlog.error(message)
    if Installation.detect(dict(os.environ)).release_line().is_7x:
        line = driverlog.scrub(one_line(message))
        out = driverlog.stream if driverlog.stream is not None else sys.stderr
        out.write(f"{line};\n")
        out.flush()


STALE_NAME_RE = re.compile(
    r"^(?:\.onemarket-lxd\.(?P<a>[^.]+)\.[^.]+|\..+\.(?P<b>[^.]+)\.[^.]+\.part)$"
)
"""A leftover of ours: the lxd work folder or a ``.part`` file, named with host and pid."""


def _owner_tag() -> str:
    """``<host>-<pid>`` in leftover names, so a later run can tell whether their owner died."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_leftovers(dest: str, environ: Any = None) -> list[Path]:
    """Remove what a SIGKILLed run of this host left (its ``.part`` file or lxd work folder),
    beside the destination and in the lxd temporary folder; the owner's pid must be gone."""
    env = os.environ if environ is None else environ
    folders = [Path(env.get("TMPDIR") or DEFAULT_LXD_TMP)]
    if dest != "-":
        folders.insert(0, Path(dest).parent)
    host_prefix = _owner_tag().rsplit("-", 1)[0] + "-"
    removed: list[Path] = []
    for folder in folders:
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
        except OSError:
            continue
        for name in names:
            m = STALE_NAME_RE.match(name)
            tag = m and (m.group("a") or m.group("b"))
            if not tag or not tag.startswith(host_prefix):
                continue
            pid = tag[len(host_prefix) :]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
            driverlog.info(f"removed {path}, left by an earlier download that was killed")
    return removed


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``downloader.sh [options] FROM TO``."""
    args = list(sys.argv[1:] if argv is None else argv)
    scheme = request_scheme(args)
    if scheme is None:
        return exec_stock(args)
    from .transfer.interrupt import interruptible

    driverlog.set_debug(driverlog.debug_from_env())
    driverlog.route_std_logging()
    what = f"{scheme} download"
    try:
        with interruptible(what):
            opts = parse_args(args)
            remove_stale_leftovers(opts.dest)
            if scheme == "lxd://":
                download_lxd(opts, os.environ)
            else:
                download_s3(opts, os.environ)
    except MarketError as exc:
        report_failure(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        report_failure(f"{what} interrupted")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        report_failure(f"{what} failed ({type(exc).__name__})")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
