"""Where streamed bytes end: the :class:`Sink` protocol and the downloader's destinations.

A sink has three methods, as simplestreams' object store has three: ``write(data)`` appends,
``commit()`` publishes what was written (atomically where the destination allows), ``abort()``
removes it and is safe to call at any point, twice included. :class:`local.AtomicFile` is the
local atomic sink, :class:`remote.RemoteAtomicFile` its ssh twin, ``backends.s3.S3Upload``
the s3 one (a PUT, or a multipart upload completed or aborted); :class:`FileSink` adds what
``downloader.sh`` does with a path (a device or FIFO written in place, tar and zip unpacked) and
:class:`StdoutSink` writes to fd 1.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import StorageError, from_os_error
from .local import AtomicFile, unique_temp
from .sources import CHUNK_BYTES
from .stages import SNIFF_BYTES, detect_archive

WRITE_BUFFER_BYTES = CHUNK_BYTES
"""Buffer of standard output or an in-place device (one chunk)."""


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StdoutSink:
    """Data to fd 1, nothing else ever written there."""

    def __init__(self) -> None:
        self._out = open(1, "wb", buffering=WRITE_BUFFER_BYTES, closefd=False)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self._do(self._out.write, data)

    def commit(self, unpack: bool = False) -> None:
        self._do(self._out.flush)

    @staticmethod
    def _do(call: Callable[..., object], *args: bytes) -> None:
        try:
            call(*args)
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
    """A file path, written through :class:`local.AtomicFile` (hidden name beside it whose
    prefix carries ``owner_tag``, so a later run can remove what a killed one left).

    On failure nothing is left at the destination (as the stock script, which truncates it at
    the start, a stale file there is removed too). An existing device or FIFO is written in place.
    ``commit(unpack=True)`` unpacks an archive (tar, zip) into a directory of that name, as the
    stock script does.
    """

    def __init__(self, dest: str, what: str, owner_tag: str = "") -> None:
        self.dest = Path(dest)
        self.what = what
        self._file: AtomicFile | None = None
        self._fh: BinaryIO | None = None
        try:
            st = self.dest.stat()
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise from_os_error(exc, f"destination {dest}") from None
        if st is not None and self.dest.is_dir():
            raise StorageError(f"destination {dest} is a directory")
        if st is not None and not self.dest.is_file():
            try:
                self._fh = open(self.dest, "wb", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115
            except OSError as exc:
                raise from_os_error(exc, f"destination {dest}") from None
            return
        prefix = f".{self.dest.name}.{owner_tag}." if owner_tag else f".{self.dest.name}."
        temp = unique_temp(self.dest, prefix=prefix)
        self._file = AtomicFile(self.dest, temp=temp, mode=0o666 & ~umask())

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            return
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise from_os_error(exc, f"writing {self.dest}") from None

    def commit(self, unpack: bool = False) -> None:
        if self._file is None:
            assert self._fh is not None
            try:
                self._fh.close()
            except OSError as exc:
                raise from_os_error(exc, f"writing {self.dest}") from None
            return
        kind = self._archive_kind() if unpack else None
        self._file.commit(install=None if kind is None else lambda tmp, _: self._unpack(kind, tmp))
        self._file = None  # published: no longer ours to remove

    def _archive_kind(self) -> str | None:
        assert self._file is not None
        with open(self._file.tmp, "rb") as fh:
            return detect_archive(fh.read(SNIFF_BYTES))

    def _unpack(self, kind: str, tmp: Path) -> None:
        """Unpack into a fresh directory beside the destination, then put it in its place."""
        out = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=self.dest.parent))
        try:
            if kind == "tar":
                with tarfile.open(tmp, "r:") as tar:
                    extract_data(tar, out)
            else:
                with zipfile.ZipFile(tmp) as zf:
                    zf.extractall(out)
            os.chmod(out, 0o777 & ~umask())
            if self.dest.is_file() or self.dest.is_symlink():
                self.dest.unlink()
            os.rename(out, self.dest)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, ValueError) as exc:
            shutil.rmtree(out, ignore_errors=True)
            raise StorageError(f"{self.what}: cannot unpack the {kind} archive ({exc})") from None
        tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            return
        if self._file is not None:
            self._file.abort()
            self._file = None
            try:
                if self.dest.is_file() and not self.dest.is_symlink():
                    self.dest.unlink()
            except OSError:
                pass


def extract_data(tar: tarfile.TarFile, out: Path) -> None:
    """``extractall`` under tarfile's ``data`` filter: no absolute or escaping name or link, no
    device or FIFO, no owner, no set-id or group/other write bits. Python has that filter from
    3.11.4 on; Debian 12's python3 (3.11.2) has not, and there :func:`_data_members` makes the
    same checks member by member, as the extraction goes (a symlink extracted earlier counts)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(out, filter="data")
    else:
        tar.extractall(out, members=_data_members(tar, out))


def _data_members(tar: tarfile.TarFile, out: Path) -> Iterator[tarfile.TarInfo]:
    root = os.path.realpath(out)

    def inside(path: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    for member in tar:
        name = member.name.lstrip("/")
        dest = os.path.join(root, name)
        if not inside(dest):
            raise tarfile.TarError(f"{member.name!r} would be outside the destination")
        if member.issym() or member.islnk():
            base = os.path.dirname(dest) if member.issym() else root
            if os.path.isabs(member.linkname) or not inside(os.path.join(base, member.linkname)):
                raise tarfile.TarError(f"{member.name!r} links outside the destination")
        elif not (member.isreg() or member.isdir()):
            raise tarfile.TarError(f"{member.name!r} is a special file")
        safe = copy.copy(member)
        safe.name = name
        safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
        if member.isreg() or member.islnk():
            mode = member.mode & 0o755 | 0o600
            safe.mode = mode if member.mode & 0o100 else mode & ~0o111
        elif member.isdir():
            safe.mode = member.mode & 0o755 | 0o700
        yield safe
