"""The mirror tree on disk: verified files staged, then published with the catalog at once.

A store in the manner of simplestreams' ``ObjectStore`` (insert, exists, remove), with the one
extra step a mirror needs to stay valid while it changes:

* :meth:`LocalStore.insert` downloads nothing itself: it streams a source through the transfer
  layer's atomic writer (``.part`` temporary, hashed, fsynced, verified) into a *staged* name
  beside the final one (``.<name>.<identity>.ready``), never over a published file;
* :meth:`LocalStore.publish` renames the staged files over their public names and replaces the
  catalog files, SIGINT/SIGTERM/SIGHUP held back for those few renames, so a run killed at any
  point before leaves the previous mirror valid, and a run killed after a file was staged keeps
  it for the next run (no second download);
* the manifest (``.onemarket-mirror/manifest.json``) records the identity (size and checksums)
  of every published file, so an unchanged file is known by a ``stat``, not by re-hashing it.

One run at a time holds ``.onemarket-mirror/lock`` (``flock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChecksumError, StorageError, from_os_error
from ..progress import Progress
from ..transfer.local import atomic_file, fsync_dir, temp_name, write_atomically
from ..transfer.sources import Source
from .model import MirrorFile, safe_relative

STATE_DIR = ".onemarket-mirror"
MANIFEST = "manifest.json"
LOCK = "lock"
MANIFEST_FORMAT = 1
READY_SUFFIX = ".ready"
NEW_SUFFIX = ".new"
IDENTITY_HEX_CHARS = 16
"""Characters of the identity hash in a staged file's name (64 bits: distinct versions of one
file never collide)."""
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals held back while :meth:`LocalStore.publish` renames (delivered right after)."""
DIR_MODE = 0o755
"""Folders of the tree must be listable by the web server, whatever the umask."""


@dataclass(frozen=True)
class Inserted:
    path: str
    size: int
    md5: str
    sha256: str


class LocalStore:
    """A mirror tree in a local folder (also an http marketplace's PUBLIC_DIR sub-folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self._manifest: dict[str, str] | None = None

    # ----------------------------------------------------------------------- lock, manifest

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the tree for this run; StorageError when another run holds it."""
        try:
            self._mkdirs(self.state)
            fd = os.open(self.state / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise from_os_error(exc, f"cannot use mirror folder {self.root}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StorageError(
                        f"another one-market mirror run is writing {self.root}"
                    ) from None
                raise from_os_error(exc, f"cannot lock {self.root}") from None
            yield
        finally:
            os.close(fd)

    @property
    def manifest(self) -> dict[str, str]:
        if self._manifest is None:
            try:
                doc = json.loads((self.state / MANIFEST).read_bytes())
                files = doc["files"] if doc.get("format") == MANIFEST_FORMAT else {}
                self._manifest = {str(k): str(v) for k, v in files.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._manifest = {}  # no manifest: every file is fetched (and verified) again
        return self._manifest

    def _save_manifest(self) -> None:
        data = json.dumps({"format": MANIFEST_FORMAT, "files": self.manifest}, indent=0)
        self._write_bytes(self.state, MANIFEST, data.encode())

    # ----------------------------------------------------------------------- paths

    def final_path(self, path: str) -> Path:
        return self.root.joinpath(*safe_relative(path).parts)

    def ready_path(self, f: MirrorFile) -> Path:
        final = self.final_path(f.path)
        tag = hashlib.sha256(f.identity.encode()).hexdigest()[:IDENTITY_HEX_CHARS]
        return final.with_name(f".{final.name}.{tag}{READY_SUFFIX}")

    @staticmethod
    def _size_is(path: Path, size: int | None) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    # ----------------------------------------------------------------------- the three methods

    def exists(self, f: MirrorFile) -> bool:
        """The published file is this one (same identity in the manifest, same size)."""
        return self.manifest.get(f.path) == f.identity and self._size_is(
            self.final_path(f.path), f.size
        )

    def staged(self, f: MirrorFile) -> bool:
        """A verified copy waits under its staged name (left by an interrupted run)."""
        return self._size_is(self.ready_path(f), f.size)

    def insert(self, f: MirrorFile, source: Source, progress: Progress | None = None) -> Inserted:
        """Stream ``source`` into the staged name of ``f``, verified against size, MD5 and
        SHA-256 of the catalog (those it gives); nothing is left behind on failure."""
        ready = self.ready_path(f)
        self._mkdirs(ready.parent)
        with contextlib.suppress(FileNotFoundError):  # a killed run's temporary (we hold the lock)
            os.unlink(ready.parent / temp_name(ready.name))
        result = write_atomically(
            source,
            ready.parent,
            ready.name,
            expected_md5=f.md5,
            progress=progress,
            sha256=bool(f.sha256),
        )
        digests = result.digests
        sha256 = digests.sha256
        problem = ""
        if f.sha256 and sha256 != f.sha256:
            problem = f"SHA-256 mismatch (catalog {f.sha256}, read {sha256})"
        elif f.size is not None and digests.size_bytes != f.size:
            problem = f"size mismatch (catalog {f.size} bytes, read {digests.size_bytes})"
        if problem:
            with contextlib.suppress(OSError):
                os.unlink(ready)
            raise ChecksumError(f"{source.description}: {problem}")
        return Inserted(f.path, digests.size_bytes, digests.md5, sha256)

    def remove(self, path: str) -> None:
        try:
            os.unlink(self.final_path(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise from_os_error(exc, f"cannot remove {path} from {self.root}") from None
        self.manifest.pop(path, None)

    # ----------------------------------------------------------------------- catalogs

    def read_catalogs(self, names: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for name in names:
            with contextlib.suppress(OSError):
                out[name] = self.final_path(name).read_bytes()
        return out

    def valid(self, paths: Iterable[str]) -> bool:
        """Every path is a published, verified file still in place (a previous mirror's)."""
        for path in paths:
            identity = self.manifest.get(path)
            if identity is None or not self.final_path(path).is_file():
                return False
        return True

    def publish(self, staged: Iterable[MirrorFile], catalogs: Mapping[str, bytes]) -> None:
        """Make ``staged`` files and ``catalogs`` (in order) the published mirror.

        Everything is written first (new manifest and catalogs under temporary names), so a
        full disk fails here with the previous mirror untouched; then only renames follow,
        SIGINT/SIGTERM/SIGHUP held back while they run."""
        staged = list(staged)
        manifest = {**self.manifest, **{f.path: f.identity for f in staged}}
        data = json.dumps({"format": MANIFEST_FORMAT, "files": manifest}, indent=0).encode()
        pending: list[tuple[Path, Path]] = []
        try:
            # what did not change is not rewritten: a second run leaves the tree as it was
            # (same mtimes and ETags for the web server, nothing for rsync to copy)
            for final, body in [(self.state / MANIFEST, data)] + [
                (self.final_path(name), body) for name, body in catalogs.items()
            ]:
                if not _holds(final, body):
                    pending.append(self._write_new(final, body))
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
            try:
                folders: set[Path] = set()
                moves = [(self.ready_path(f), self.final_path(f.path)) for f in staged] + pending
                for source, final in moves:
                    try:
                        os.replace(source, final)
                    except OSError as exc:
                        raise from_os_error(exc, f"cannot publish {final}") from None
                    folders.add(final.parent)
                for folder in folders:
                    fsync_dir(folder)
                self._manifest = manifest
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        except BaseException:  # the .new files not renamed yet (staged files stay, verified)
            for new, _final in pending:
                with contextlib.suppress(OSError):
                    os.unlink(new)
            raise

    def prune(self, keep: Iterable[str], keep_staged: Iterable[MirrorFile]) -> list[str]:
        """Remove every file of the tree that ``keep`` (relative paths) does not name, and
        folders left empty; staged files of ``keep_staged`` stay for the next run."""
        kept = {self.final_path(p) for p in keep}
        kept |= {self.ready_path(f) for f in keep_staged}
        removed: list[str] = []
        for folder, dirs, files in os.walk(self.root, topdown=False):
            here = Path(folder)
            if here == self.root:
                dirs[:] = [d for d in dirs if d != STATE_DIR]
            if STATE_DIR in here.relative_to(self.root).parts:
                continue
            for name in files:
                path = here / name
                if path in kept:
                    continue
                rel = path.relative_to(self.root).as_posix()
                try:
                    path.unlink()
                except OSError as exc:
                    raise from_os_error(exc, f"cannot prune {path}") from None
                self.manifest.pop(rel, None)
                removed.append(rel)
            if here != self.root:
                with contextlib.suppress(OSError):
                    here.rmdir()  # only when empty
        if removed:
            self._save_manifest()
        return removed

    # ----------------------------------------------------------------------- helpers

    def _mkdirs(self, folder: Path) -> None:
        try:
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, f"cannot create {folder}") from None

    def _write_bytes(self, folder: Path, name: str, data: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / temp_name(name))
        with atomic_file(folder / name) as out:
            out.write(data)

    def _write_new(self, final: Path, data: bytes) -> tuple[Path, Path]:
        """``data`` written (synced) beside ``final`` under a hidden name: (that name, final)."""
        self._mkdirs(final.parent)
        name = f".{final.name}{NEW_SUFFIX}"
        self._write_bytes(final.parent, name, data)
        return final.parent / name, final


def _holds(path: Path, data: bytes) -> bool:
    """``path`` already has exactly ``data`` (a catalog or manifest: a few MB at most)."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False
