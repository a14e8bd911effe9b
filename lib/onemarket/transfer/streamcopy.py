"""Copy a source into a sink while hashing every byte, keeping holes as holes.

The calling thread reads; MD5, SHA-256 and the writes run in three threads fed the same
chunks (hashlib and os.write release the GIL), so an import costs about its slowest part (MD5,
usually), not the sum of all. Bounded queues of ``QUEUE_CHUNKS`` chunks sit between them:
memory stays flat whatever the image size. A local regular file is read with
``SEEK_DATA``/``SEEK_HOLE`` so its holes are never read (they are still hashed: MD5 must cover
every byte); any other source is read sequentially and its all-zero blocks become holes at the
sink.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from ..errors import SourceError
from ..progress import Progress
from .hashing import Digests
from .interrupt import Deadline
from .sources import CHUNK_BYTES, Source

SPARSE_BLOCK_BYTES = 4096
"""Granularity of hole detection: an all-zero block of this size is seeked over, not written
(the usual filesystem block; what ``cp --sparse=always`` uses)."""
QUEUE_CHUNKS = 8
"""Chunks queued for each worker (MD5, SHA-256, writer). They share the same chunk objects,
so at most about this many + 1 chunks (9 MiB) are held whatever the image size."""
WORKER_JOIN_S = 10.0
"""Longest wait for a worker thread to stop after a failure (the writer is aborted first)."""
HOLE_PIECE_BYTES = 64 << 20
"""Largest hole handed to the workers at once (hashing 64 MiB of zeros takes ~0.1 s)."""
QUEUE_POLL_S = 0.5
"""How often a blocked reader re-checks whether the writer failed."""

_ZERO_CHUNK = bytes(CHUNK_BYTES)
_ZERO_VIEW = memoryview(_ZERO_CHUNK)
_ZERO_BLOCK = bytes(SPARSE_BLOCK_BYTES)

Segment = bytes | int
"""Bytes to write, or the length of a run of zeros known to be a hole."""


class Sink(Protocol):
    """Where the bytes go: sequential writes and skips, plus a way to unblock a stuck write."""

    def write(self, data: bytes) -> None: ...

    def skip(self, count: int) -> None: ...

    def abort(self) -> None: ...


def data_runs(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of the runs of ``data`` made of blocks that are not all zero."""
    size = len(data)
    if size == CHUNK_BYTES and data == _ZERO_CHUNK:
        return []
    # No run of a block's worth of zeros anywhere: all data. One C-speed scan instead of a
    # Python loop per block, which matters because the loop holds the GIL that the hashing
    # threads need back after every chunk.
    if isinstance(data, bytes) and data.find(_ZERO_BLOCK) < 0:
        return [(0, size)] if size else []
    runs: list[tuple[int, int]] = []
    run_start = -1
    for off in range(0, size, SPARSE_BLOCK_BYTES):
        end = min(off + SPARSE_BLOCK_BYTES, size)
        # Most data blocks have a non-zero first byte: the slice compare is rarely needed.
        zero = data[off] == 0 and data[off:end] == _ZERO_BLOCK[: end - off]
        if zero:
            if run_start >= 0:
                runs.append((run_start, off))
                run_start = -1
        elif run_start < 0:
            run_start = off
    if run_start >= 0:
        runs.append((run_start, size))
    return runs


def file_segments(fd: int, description: str) -> Iterator[Segment]:
    """Segments of a local regular file, holes found with SEEK_DATA/SEEK_HOLE and not read."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA)
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                data_at, hole_at = size, size
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support here
                data_at, hole_at = offset, size
            else:
                raise SourceError(f"cannot read {description}: {exc.strerror}") from None
        data_at = min(max(data_at, offset), size)
        hole_at = min(hole_at, size) if hole_at > data_at else size
        while offset < data_at:
            # Holes go by in bounded pieces so that progress, deadlines and cancel stay timely.
            piece = min(data_at - offset, HOLE_PIECE_BYTES)
            yield piece
            offset += piece
        while offset < hole_at:
            try:
                data = os.pread(fd, min(CHUNK_BYTES, hole_at - offset), offset)
            except OSError as exc:
                raise SourceError(f"cannot read {description}: {exc.strerror}") from None
            if not data:
                raise SourceError(
                    f"{description} shrank while being read ({offset} of {size} bytes read)"
                )
            yield data
            offset += len(data)


def source_segments(source: Source) -> Iterator[Segment]:
    """Segments of any source: local regular files skip their holes, others read in chunks."""
    fileno = getattr(source, "fileno", None)
    if fileno is not None:
        fd = fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            yield from file_segments(fd, source.description)
            return
    while True:
        data = source.read(CHUNK_BYTES)
        if not data:
            return
        yield data


class _Worker(threading.Thread):
    """Applies segments in order with ``apply``; the first error stops it and is kept."""

    def __init__(self, name: str, apply: Callable[[Segment], None], abort: Callable[[], None]):
        super().__init__(name=f"onemarket-{name}", daemon=True)
        self.apply = apply
        self.abort = abort
        self.items: queue.Queue[Segment | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.error: BaseException | None = None
        self.cancelled = threading.Event()

    def run(self) -> None:
        # Polling, not a blocking get: a cancel needs no queue operation (and so no queue lock,
        # which a KeyboardInterrupt may have caught the reading thread holding).
        while not self.cancelled.is_set():
            try:
                item = self.items.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.apply(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                self.error = exc

    def put(self, item: Segment | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.items.put(item, timeout=QUEUE_POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop soon, whatever is queued; bounded wait (the thread is a daemon anyway)."""
        self.cancelled.set()
        self.abort()
        self.join(WORKER_JOIN_S)


def _hash_segment(update: Callable[[bytes | memoryview], None]) -> Callable[[Segment], None]:
    def apply(segment: Segment) -> None:
        if isinstance(segment, int):
            while segment > 0:
                piece = min(segment, CHUNK_BYTES)
                update(_ZERO_VIEW[:piece])
                segment -= piece
        else:
            update(segment)

    return apply


def _sink_segment(sink: Sink) -> Callable[[Segment], None]:
    def apply(segment: Segment) -> None:
        if isinstance(segment, int):
            sink.skip(segment)
        else:
            sink.write(segment)

    return apply


def _nothing() -> None:
    pass


def copy_stream(
    source: Source,
    sink: Sink,
    *,
    progress: Progress | None = None,
    deadline: Deadline | None = None,
) -> Digests:
    """Copy every byte of ``source`` to ``sink``; returns the digests of what was read.

    The calling thread reads; MD5, SHA-256 and the sink each run in their own thread, fed the
    same chunks in order. Fails when a source that announced its size delivers another.
    """
    digests = Digests()
    md5_update, sha256_update = digests.feeders()
    workers = [
        _Worker("md5", _hash_segment(md5_update), _nothing),
        _Worker("sha256", _hash_segment(sha256_update), _nothing),
        _Worker("writer", _sink_segment(sink), sink.abort),
    ]
    for worker in workers:
        worker.start()
    try:
        for segment in source_segments(source):
            if deadline is not None:
                deadline.check()
            count = segment if isinstance(segment, int) else len(segment)
            for worker in workers:
                worker.put(segment)
            digests.count(count)
            if progress is not None:
                progress.update(count)
        for worker in workers:
            worker.finish()
    except BaseException:
        for worker in workers:
            worker.cancel()
        raise
    expected = source.size_bytes
    if expected is not None and digests.size_bytes != expected:
        raise SourceError(
            f"{source.description} delivered {digests.size_bytes} bytes, {expected} announced"
        )
    if progress is not None:
        progress.finish()
    return digests


class SparseFileSink:
    """Writes into a file descriptor, seeking over all-zero blocks; ``finish`` sets the size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start, end in data_runs(data):
            _pwrite_all(self.fd, view[start:end], self.offset + start)
        self.offset += len(data)

    def skip(self, count: int) -> None:
        self.offset += count

    def abort(self) -> None:
        """Nothing to unblock: local writes end by themselves."""

    def finish(self) -> None:
        """Give the file its full size: a trailing hole is not written by anything else."""
        os.ftruncate(self.fd, self.offset)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class PipeSink:
    """Writes into a pipe (a helper's stdin); holes are sent as zeros, the far end re-creates
    them. ``abort`` kills the helper so that a write blocked on a stalled link returns."""

    def __init__(self, fd: int, on_abort: object = None) -> None:
        self.fd = fd
        self._on_abort = on_abort

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def skip(self, count: int) -> None:
        while count > 0:
            piece = min(count, CHUNK_BYTES)
            self.write(memoryview(_ZERO_CHUNK)[:piece])
            count -= piece

    def abort(self) -> None:
        if callable(self._on_abort):
            self._on_abort()
