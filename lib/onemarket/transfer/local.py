"""The one atomic file writer, and the hashed, sparse import built on it.

Every file this project publishes (an imported image, a downloaded one, the http and qcow2
caches, the mirror's files) is written by :class:`AtomicFile`: a temporary name in the
destination folder (same filesystem, so the final rename is atomic), created with O_EXCL, fsynced,
renamed, the folder fsynced. Whatever goes wrong, including SIGTERM from the MAD, the temporary
file is removed: readers of the folder see either nothing or the whole file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import driverlog
from ..errors import from_os_error
from ..progress import Progress
from .hashing import Digests, Expected
from .interrupt import interruptible
from .sources import Source
from .streamcopy import SparseFileSink, copy_stream

PUBLIC_FILE_MODE = 0o644
"""Published files must be readable by the web server, whatever the driver's umask."""
PRIVATE_FILE_MODE = 0o600
"""Caches, and every file until it is complete: nobody else's business."""
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
TEMP_PREFIX = "."
TEMP_SUFFIX = ".part"
UNIQUE_PREFIX = ".tmp-"
"""Prefix of :func:`unique_temp` names by default."""
TEMP_TOKEN_BYTES = 4
"""Random bytes in a :func:`unique_temp` name (8 hex digits, as mkstemp's 8 letters)."""


def temp_name(name: str) -> str:
    """Hidden name of the file being written, in the same folder as ``name``."""
    return f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"


def unique_temp(final: Path, prefix: str = UNIQUE_PREFIX, suffix: str = TEMP_SUFFIX) -> Path:
    """A random hidden name beside ``final``, for writers that may run side by side (caches,
    downloads); their leftovers are found again by ``prefix`` and ``suffix``."""
    return final.parent / f"{prefix}{secrets.token_hex(TEMP_TOKEN_BYTES)}{suffix}"


def owner_tag() -> str:
    """``<host>-<pid>``, put in a temporary name so that :func:`sweep_temps` can tell, later,
    whether its writer died."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def sweep_temps(
    folder: Path,
    prefix: str,
    suffix: str = TEMP_SUFFIX,
    *,
    max_age_s: float | None = None,
    left_by: str = "",
    name_re: re.Pattern[str] | None = None,
) -> list[Path]:
    """Remove what killed writers left in ``folder`` (a SIGKILL skips every clean-up): the
    entries named ``prefix...suffix`` (and matching ``name_re`` whole, where a folder is shared
    with other people's files), files or work folders, whose :func:`owner_tag` (the
    dot-separated word before the random one) names a dead process of this host, or, untagged,
    regular files older than ``max_age_s`` (None: only tagged ones go; an untagged folder's
    mtime says nothing of the writes inside it). Another host's tag is never removed. Best
    effort, never fails; with ``left_by`` each removal is an INFO line."""
    host = owner_tag().rsplit("-", 1)[0]
    now = time.time()
    removed: list[Path] = []
    try:
        entries = [
            e
            for e in os.scandir(folder)
            if e.name.startswith(prefix) and (name_re is None or name_re.fullmatch(e.name))
        ]
    except OSError:
        return removed
    for entry in entries:
        words = entry.name[len(prefix) : len(entry.name) - len(suffix)].split(".")
        if not entry.name.endswith(suffix) or not words[-1]:
            continue
        tag = re.fullmatch(r"(.+)-(\d+)", words[-2]) if len(words) > 1 else None
        try:
            if tag is not None:
                stale = tag.group(1) == host and not _pid_alive(int(tag.group(2)))
            elif max_age_s is None or not entry.is_file(follow_symlinks=False):
                stale = False
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            if not stale:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
        if left_by:
            driverlog.info(f"removed {entry.path}, left by {left_by}")
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicFile:
    """A file written under a temporary name and renamed into place by :meth:`commit`.

    ``temp`` defaults to :func:`temp_name` beside ``final``; it is created with O_EXCL, so a
    name another writer holds is refused, never shared or removed, unless ``written`` says it
    is a file already written on ``final``'s filesystem (a built disk), which is then
    published the same way. :meth:`abort` removes the
    temporary file (or the published one when the rename already happened). Prefer
    :func:`atomic_file`, which also makes a stop signal unwind through the clean-up; the class
    serves sinks whose write, commit and abort are separate calls.
    """

    def __init__(
        self,
        final: Path,
        *,
        temp: Path | None = None,
        mode: int = PUBLIC_FILE_MODE,
        written: bool = False,
    ):
        self.final = Path(final)
        self.tmp = temp if temp is not None else self.final.parent / temp_name(self.final.name)
        self.mode = mode
        self.fd = -1
        self._state = "open"  # then "renamed" (published) or "gone" (aborted)
        # a signal right after the file was created, even before ``fd`` is set, removes it
        with self.aborting():
            try:
                flags = os.O_WRONLY | os.O_CLOEXEC if written else _CREATE_FLAGS
                self.fd = os.open(self.tmp, flags, PRIVATE_FILE_MODE)
            except FileExistsError:
                self._state = "gone"  # another writer's name: never removed
                raise

    @contextmanager
    def aborting(self) -> Iterator[None]:
        """Any exception in the block aborts the file; an OSError becomes a StorageError."""
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise from_os_error(exc, f"cannot write {self.final}") from None
            raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (unbuffered: callers hand over chunks)."""
        view = memoryview(data)
        with self.aborting():
            while view:
                view = view[os.write(self.fd, view) :]

    def commit(self, install: Callable[[Path, Path], None] | None = None) -> None:
        """fsync, close, rename into place (or ``install(tmp, final)``), fsync the folder."""
        with self.aborting():
            os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            fd, self.fd = self.fd, -1
            os.close(fd)
            (install or os.rename)(self.tmp, self.final)
            self._state = "renamed"
            fsync_dir(self.final.parent)

    def abort(self) -> None:
        """Remove what was written (idempotent); a published file too: it was not wanted."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        state, self._state = self._state, "gone"
        if state != "gone":
            with contextlib.suppress(OSError):
                os.unlink(self.final if state == "renamed" else self.tmp)


@contextmanager
def atomic_file(
    final: Path, *, temp: Path | None = None, mode: int = PUBLIC_FILE_MODE, what: str = ""
) -> Iterator[AtomicFile]:
    """An :class:`AtomicFile` committed when the block ends, aborted on any exception or stop
    signal (even one arriving after the rename: the caller reports a failure, so nothing
    stays). An OSError in the block becomes a StorageError naming ``final``; ``what`` names the
    work in the message of a stop signal."""
    with interruptible(what or f"writing {final}"):
        out = AtomicFile(final, temp=temp, mode=mode)
        with out.aborting():
            yield out
            out.commit()


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class WriteResult:
    path: Path
    digests: Digests


def write_atomically(
    source: Source,
    folder: Path,
    name: str,
    *,
    expected_md5: Expected = "",
    progress: Progress | None = None,
    sha256: bool = False,
) -> WriteResult:
    """Stream ``source`` into ``folder/name`` (holes kept, hashed, verified), atomically; the
    digests also hold SHA-256 when ``sha256`` asks for it."""
    with atomic_file(folder / name, what=f"import into {folder}") as out:
        direct_fd = _open_direct(out.tmp)
        try:
            sink = SparseFileSink(out.fd, early_writeback=True, direct_fd=direct_fd)
            digests = copy_stream(source, sink, progress=progress, sha256=sha256)
            sink.finish()
        finally:
            if direct_fd is not None:
                os.close(direct_fd)
        digests.verify_md5(expected_md5, f"import of {source.description}")
    return WriteResult(out.final, digests)


def _open_direct(path: Path) -> int | None:
    """The temporary file opened a second time with O_DIRECT, or None where the filesystem
    (tmpfs, some network filesystems) or the platform has no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return None
