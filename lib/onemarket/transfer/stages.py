"""Stages between a source and a sink for the datastore downloader: format sniffing,
decompression, rate limit, checksums, a byte limit, one chunk at a time.

The stock ``downloader.sh`` options map onto them: ``-n`` (no decompression), ``-l`` (rate
limit), ``-c`` (first bytes only), ``-m``/``-s`` (checksums, :class:`hashing.Verifier`).
A stage is anything with ``feed(data) -> Iterator[bytes]`` and ``finish()``; the pipeline
(:func:`pump`) reads the source, hashes and throttles the raw bytes, feeds them through the
decompressor when the head says so, and writes what comes out to a :class:`sinks.Sink`.
"""

from __future__ import annotations

import bz2
import lzma
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from .hashing import Verifier
from .sources import CHUNK_BYTES, Source

if TYPE_CHECKING:
    from .sinks import Sink

SNIFF_BYTES = 512
"""Head of the downloaded stream kept to recognise compression, and of the decompressed stream
to recognise tar (magic at offset 257) and zip archives."""
MIN_THROTTLED_READ_BYTES = 16 * 1024
"""Smallest read under ``-l``, so a low rate still sleeps in short, even steps."""

GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC_RE = re.compile(rb"BZh[1-9]")
XZ_MAGIC = b"\xfd7zXZ\x00"
TAR_MAGIC_OFFSET = 257
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


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
    """Streaming decompression of concatenated gzip/bzip2/xz members (or one legacy ``lzma``
    stream, as old .deb members are), bounded output per call.

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
        return lzma.LZMADecompressor(
            format=lzma.FORMAT_XZ if self.kind == "xz" else lzma.FORMAT_ALONE
        )

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


@dataclass
class PumpResult:
    raw_bytes: int
    out_bytes: int
    partial: bool


def pump(
    source: Source,
    sink: Sink,
    verifier: Verifier,
    *,
    decompress: bool = True,
    max_bytes: int | None = None,
    limit_bps: float | None = None,
) -> PumpResult:
    """Raw bytes -> checksums (and rate limit) -> decompressor -> sink, one chunk at a time.

    With ``max_bytes`` the copy stops once that many output bytes are out (checksums are then
    not compared: a partial read cannot be verified, which is why the stock script refuses
    -m/-s with -c). Otherwise every checksum is compared at the end.
    """
    limiter = RateLimiter(limit_bps) if limit_bps else None
    read_size = limiter.read_size if limiter else CHUNK_BYTES
    head = b""
    while len(head) < SNIFF_BYTES:
        data = source.read(read_size)
        if not data:
            break
        head += data
    kind = detect_compression(head) if decompress else None
    decomp = Decompressor(kind, verifier.what) if kind else None
    raw = out = 0
    data = head
    while data:
        raw += len(data)
        verifier.update(data)
        if limiter:
            limiter.consumed(len(data))
        for piece in decomp.feed(data) if decomp else (data,):
            if max_bytes is not None and out + len(piece) >= max_bytes:
                sink.write(piece[: max_bytes - out])
                return PumpResult(raw, max_bytes, partial=True)
            sink.write(piece)
            out += len(piece)
        data = source.read(read_size)
    if decomp:
        decomp.finish()
    verifier.verify()
    return PumpResult(raw, out, partial=False)
