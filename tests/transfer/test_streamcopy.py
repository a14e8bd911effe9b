"""Copy engine: every byte hashed, holes kept, sizes checked, failures stop the writer."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
from pathlib import Path

import pytest
from onemarket.errors import SourceError
from onemarket.progress import Progress, ProgressEvent
from onemarket.transfer.hashing import Digests
from onemarket.transfer.interrupt import STOP_SIGNALS
from onemarket.transfer.sources import CHUNK_BYTES, FileSource, open_source
from onemarket.transfer.streamcopy import (
    SPARSE_BLOCK_BYTES,
    SparseFileSink,
    copy_stream,
    data_runs,
    file_extents,
)

MIB = 1 << 20


def make_sparse(path: Path, layout: list[tuple[int, bytes]], size: int) -> bytes:
    """A sparse file of ``size`` bytes with ``data`` written at each offset; its content."""
    content = bytearray(size)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in layout:
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class Stream:
    """A non-file source (pipe-like): no fileno, unknown size."""

    def __init__(self, data: bytes, piece: int = 100_000) -> None:
        self._io = io.BytesIO(data)
        self.piece = piece
        self.description = "test stream"
        self.size_bytes: int | None = None

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        return self._io.read(min(n, self.piece))


def copy_to(path: Path, source: object, **kw: object) -> Digests:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sink = SparseFileSink(fd)
        digests = copy_stream(source, sink, **kw)  # type: ignore[arg-type]
        sink.finish()
    finally:
        os.close(fd)
    return digests


def test_data_runs_finds_nonzero_blocks() -> None:
    b = SPARSE_BLOCK_BYTES
    data = bytes(b) + b"x" * b + bytes(b) + bytes(b - 1) + b"y" + b"z" * 10
    assert data_runs(data) == [(b, 2 * b), (3 * b, len(data))]
    assert data_runs(bytes(CHUNK_BYTES)) == []
    assert data_runs(b"") == []


def test_update_zeros_equals_hashing_zero_bytes() -> None:
    d = Digests()
    d.update(b"ab")
    d.update_zeros(3 * MIB + 5)
    assert d.md5 == hashlib.md5(b"ab" + bytes(3 * MIB + 5)).hexdigest()
    assert d.sha256 == hashlib.sha256(b"ab" + bytes(3 * MIB + 5)).hexdigest()
    assert Digests(sha256=False).sha256 == ""
    assert d.size_bytes == 3 * MIB + 7


def test_local_sparse_file_keeps_holes_and_hashes_every_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    content = make_sparse(
        src, [(0, os.urandom(8192)), (5 * MIB, os.urandom(100)), (9 * MIB, b"end")], 16 * MIB
    )
    dst = tmp_path / "dst"
    with open_source(str(src)) as s:
        digests = copy_to(dst, s)
    assert dst.read_bytes() == content
    assert digests.md5 == hashlib.md5(content).hexdigest()
    assert digests.size_bytes == 16 * MIB
    assert allocated(dst) <= allocated(src)
    assert allocated(dst) < 64 * 1024


def test_file_extents_skip_holes_without_reading(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sparse(src, [(4 * MIB, b"data")], 8 * MIB)
    with src.open("rb") as f:
        extents = list(file_extents(f.fileno(), "src"))
    holes = sum(n for _, n, is_data in extents if not is_data)
    read = sum(n for _, n, is_data in extents if is_data)
    assert holes + read == 8 * MIB
    assert holes >= 4 * MIB
    assert [off for off, _, _ in extents] == sorted(off for off, _, _ in extents)


def test_stream_zero_blocks_become_holes(tmp_path: Path) -> None:
    content = os.urandom(10_000) + bytes(6 * MIB) + os.urandom(3) + bytes(2 * MIB)
    dst = tmp_path / "dst"
    digests = copy_to(dst, Stream(content))
    assert dst.read_bytes() == content
    assert digests.md5 == hashlib.md5(content).hexdigest()
    assert allocated(dst) < 64 * 1024


def test_all_zero_source_gives_a_hole_of_full_size(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    copy_to(dst, Stream(bytes(3 * MIB + 17)))
    assert dst.stat().st_size == 3 * MIB + 17
    assert allocated(dst) <= SPARSE_BLOCK_BYTES


def test_short_source_is_refused(tmp_path: Path) -> None:
    stream = Stream(b"abc")
    stream.size_bytes = 10
    with pytest.raises(SourceError, match="delivered 3 bytes, 10 announced"):
        copy_to(tmp_path / "dst", stream)


def test_file_truncated_while_read_fails(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 * MIB))

    class Shrinking(FileSource):
        def fileno(self) -> int:
            fd = super().fileno()
            os.truncate(src, MIB)
            return fd

    with src.open("rb") as f, pytest.raises(SourceError, match=r"shrank|delivered"):
        copy_to(tmp_path / "dst", Shrinking(f, str(src), 4 * MIB))


def test_a_non_sparse_zero_run_becomes_a_hole(tmp_path: Path) -> None:
    """Zeros written as data (a raw image copied without holes) are not written either."""
    src = tmp_path / "src"
    content = os.urandom(5000) + bytes(20 * MIB) + os.urandom(7)
    src.write_bytes(content)
    dst = tmp_path / "dst"
    with open_source(str(src)) as s:
        digests = copy_to(dst, s)
    assert dst.read_bytes() == content and digests.md5 == hashlib.md5(content).hexdigest()
    assert allocated(dst) < 64 * 1024


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
@pytest.mark.parametrize("size", [4 * MIB - 1, 8 * MIB, 30 * MIB + 3])
def test_local_file_through_the_buffer_pool(tmp_path: Path, size: int, direct: bool) -> None:
    """More chunks than pooled buffers, sizes on and off the chunk and block boundaries, zero
    blocks inside the data; written through O_DIRECT where the filesystem has it."""
    src = tmp_path / "src"
    content = os.urandom(size - 3 * SPARSE_BLOCK_BYTES - 100)
    content = content[:5000] + bytes(3 * SPARSE_BLOCK_BYTES + 100) + content[5000:]
    src.write_bytes(content)
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    direct_fd = None
    if direct:
        with contextlib.suppress(OSError):
            direct_fd = os.open(dst, os.O_WRONLY | os.O_DIRECT)
    try:
        sink = SparseFileSink(fd, direct_fd=direct_fd)
        with open_source(str(src)) as s:
            digests = copy_stream(s, sink, sha256=True)
        sink.finish()
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
        os.close(fd)
    assert dst.read_bytes() == content
    assert digests.md5 == hashlib.md5(content).hexdigest()
    assert digests.sha256 == hashlib.sha256(content).hexdigest()


def test_writer_error_reaches_the_reader(tmp_path: Path) -> None:
    class Failing:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def skip(self, count: int) -> None:
            pass

        def abort(self) -> None:
            pass

    with pytest.raises(OSError, match="No space"):
        copy_stream(Stream(os.urandom(3 * MIB)), Failing())
    # a local file: more chunks than pooled buffers, none given back by the failed writer
    src = tmp_path / "src"
    src.write_bytes(os.urandom(40 * MIB))
    with open_source(str(src)) as s, pytest.raises(OSError, match="No space"):
        copy_stream(s, Failing())


def test_progress_reports_bytes_and_final_event(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    progress = Progress(None, events.append, interval_s=0.0)
    copy_to(tmp_path / "dst", Stream(os.urandom(2 * MIB)), progress=progress)
    assert events[-1].final and events[-1].done_bytes == 2 * MIB
    assert len(events) > 1


def test_the_copy_threads_leave_stop_signals_to_the_main_thread() -> None:
    """The writer (and the hashers) block SIGTERM/SIGINT/SIGHUP: the kernel then hands a stop
    signal to the main thread, whose blocking read of a pipe it interrupts (delivered to a
    worker, it only set Python's flag and a push reading a silent pipe never stopped)."""
    masks: list[set[int]] = []

    class Recording:
        def write(self, data: bytes) -> None:
            masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

        def skip(self, count: int) -> None:
            pass

        def abort(self) -> None:
            pass

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    copy_stream(Stream(os.urandom(MIB)), Recording())
    assert masks and all(set(STOP_SIGNALS) <= mask for mask in masks)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main thread's own
