"""Atomic, sparse, hashed write of a source into a local folder.

The bytes go to a hidden temporary name in the destination folder (same filesystem, so the
final rename is atomic), are fsynced, verified and only then renamed to their public name.
Whatever goes wrong, including SIGTERM from the MAD, the temporary file is removed: readers of
the folder see either nothing or the whole, verified file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import from_os_error
from ..progress import Progress
from .hashing import Digests
from .interrupt import Deadline, interruptible
from .sources import Source
from .streamcopy import SparseFileSink, copy_stream

PUBLIC_FILE_MODE = 0o644
"""Published files must be readable by the web server, whatever the driver's umask."""
TEMP_PREFIX = "."
TEMP_SUFFIX = ".part"


def temp_name(name: str) -> str:
    """Hidden name of the file being written, in the same folder as ``name``."""
    return f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"


@dataclass(frozen=True)
class WriteResult:
    path: Path
    digests: Digests


def write_atomically(
    source: Source,
    folder: Path,
    name: str,
    *,
    expected_md5: str = "",
    progress: Progress | None = None,
    deadline: Deadline | None = None,
) -> WriteResult:
    """Stream ``source`` into ``folder/name``: temporary file, fsync, verify, rename."""
    final = folder / name
    tmp = folder / temp_name(name)
    what = f"cannot write {final}"
    with interruptible(f"import into {folder}"):
        fd = -1
        ours = True  # the temporary name is random: unless O_EXCL says otherwise, it is ours
        renamed = False
        try:
            # Opened inside the clean-up's try: a SIGTERM right after the file is created, even
            # before ``fd`` is assigned, still removes it.
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                ours = False
                raise
            direct_fd = _open_direct(tmp)
            try:
                sink = SparseFileSink(fd, early_writeback=True, direct_fd=direct_fd)
                digests = copy_stream(source, sink, progress=progress, deadline=deadline)
                sink.finish()
                digests.verify_md5(expected_md5, f"import of {source.description}")
                os.fchmod(fd, PUBLIC_FILE_MODE)
                os.fsync(fd)
            finally:
                if direct_fd is not None:
                    os.close(direct_fd)
                os.close(fd)
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(folder)
        except BaseException as exc:
            # Interrupted even after the rename: oned records a failure, so nothing stays.
            if ours:
                with contextlib.suppress(OSError):
                    os.unlink(final if renamed else tmp)
            if isinstance(exc, OSError):
                raise from_os_error(exc, what) from None
            raise
    return WriteResult(final, digests)


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


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: some filesystems refuse fsync on folders)."""
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
