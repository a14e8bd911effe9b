"""A container disk built from rootfs tarballs without root: staging folder, mke2fs -d, debugfs.

The stock ``lxd_downloader.sh`` loop-mounts an empty file system with ``sudo`` and untars into
it; when sudo is not granted the image stays empty and still goes READY. Here nothing needs
root, and the result is the tarball's tree exactly:

1. Every member is unpacked, as the unprivileged user, into a staging folder, and its metadata
   (owner, group, mode with setuid/setgid/sticky bits, mtime, device numbers, extended
   attributes from ``SCHILY.xattr.*``/``LIBARCHIVE.xattr.*`` pax records) is kept in a list.
   Paths are normalised; a member leaving the tree, or going through a symlink of the tree, is
   refused (a hostile tarball cannot write outside the staging folder).
2. ``mke2fs -t <fs> -d staging`` writes the file system image from the folder: file contents,
   directories, symlinks, hard links (one inode), FIFOs, mtimes.
3. ``debugfs -w`` then sets what an unprivileged user cannot put in a folder: the owners and
   groups, modes the folder could not hold, device nodes (``mknod``) and extended attributes
   (``ea_set``), each from the tarball's metadata, only where the folder's value differs.

ext2, ext3 and ext4 are built this way. Other file systems (xfs, btrfs) have no rootless way
to get owners and device nodes in Debian's tools: they are refused with one line, before
anything is downloaded, naming the file systems that can be built. A tree larger than the image
is a clear "does not fit" error, never a truncated disk. qcow2 is a ``qemu-img convert`` of
the finished raw image.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import driverlog
from .errors import ConfigError, SourceError, StorageError, StorageFullError, one_line
from .transfer.sources import CHUNK_BYTES

BUILDABLE_FILESYSTEMS = ("ext4", "ext3", "ext2")
PROGRESS_INTERVAL_S = 5.0
"""Least time between two INFO lines while unpacking."""
TOOL_TIMEOUT_S = 3600.0
"""Longest run of mke2fs, debugfs or qemu-img (a 16 TiB image stays far below)."""
MAX_SYMLINK_HOPS = 40
"""Symlinks followed to resolve one overlay path (the kernel's own limit)."""
_UNSAFE_DEBUGFS_CHARS = set('"\\\n\r\t')
"""Characters debugfs cannot take in a quoted path: such entries keep the builder's owner."""

KIND_DIR, KIND_FILE, KIND_SYMLINK, KIND_HARDLINK = "dir", "file", "symlink", "hardlink"
KIND_FIFO, KIND_CHR, KIND_BLK = "fifo", "chr", "blk"
_TYPE_BITS = {
    KIND_DIR: stat.S_IFDIR,
    KIND_FILE: stat.S_IFREG,
    KIND_SYMLINK: stat.S_IFLNK,
    KIND_FIFO: stat.S_IFIFO,
    KIND_CHR: stat.S_IFCHR,
    KIND_BLK: stat.S_IFBLK,
}


@dataclass(frozen=True)
class DiskSpec:
    size_mb: int
    filesystem: str
    format: str

    def check(self) -> None:
        """Refuse what cannot be built, before any download."""
        if self.filesystem not in BUILDABLE_FILESYSTEMS:
            raise ConfigError(
                f"filesystem={self.filesystem} cannot be built without root (owners and device "
                "nodes need a rootless builder, which exists for "
                f"{', '.join(BUILDABLE_FILESYSTEMS)}): set FILESYSTEM=ext4 in the marketplace"
            )
        for tool in ("mke2fs", "debugfs") + (("qemu-img",) if self.format == "qcow2" else ()):
            if find_tool(tool) is None:
                package = "qemu-utils" if tool == "qemu-img" else "e2fsprogs"
                raise ConfigError(
                    f"{tool} is not installed (package {package}): cannot build the container disk"
                )


@dataclass
class Entry:
    """One path of the tree with the metadata the tarball gives it."""

    path: str  # relative, no leading "/" ("" is the root)
    kind: str
    mode: int  # permission bits with setuid/setgid/sticky
    uid: int
    gid: int
    mtime: float
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Stats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    devices: int = 0
    xattrs: int = 0
    unaddressable: int = 0


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _norm(name: str) -> str | None:
    """Tar member name -> relative path, "" for the root, None when it leaves the tree."""
    path = posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/")
    if path in ("", "."):
        return ""
    parts = name.strip("/").split("/")
    if ".." in parts or "\0" in name:
        return None
    return path


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    import base64

    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            with contextlib.suppress(ValueError):
                out[key[len("LIBARCHIVE.xattr.") :]] = base64.b64decode(value + "==")
    return out


class Staging:
    """The staging folder and the metadata of every entry, in tar order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700)
        self.entries: dict[str, Entry] = {"": Entry("", KIND_DIR, 0o755, 0, 0, time.time())}
        self.stats = Stats()
        self._uid, self._gid = os.geteuid(), os.getegid()

    def _host(self, path: str) -> Path:
        return self.root / path if path else self.root

    def _parents(self, path: str, what: str) -> None:
        """Create missing parents as root-owned 0755 folders; refuse symlinks on the way."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            entry = self.entries.get(prefix)
            if entry is None:
                os.mkdir(self._host(prefix), 0o755)
                self.entries[prefix] = Entry(prefix, KIND_DIR, 0o755, 0, 0, time.time())
            elif entry.kind != KIND_DIR:
                raise SourceError(
                    f"{what}: member {path!r} goes through the {entry.kind} {prefix!r} (refused)"
                )

    def _clear(self, path: str) -> None:
        """Remove what a later member of the same name replaces (tar semantics)."""
        old = self.entries.pop(path, None)
        if old is None or not path:
            return
        host = self._host(path)
        if old.kind == KIND_DIR:
            shutil.rmtree(host, ignore_errors=True)
            for key in [k for k in self.entries if k.startswith(path + "/")]:
                del self.entries[key]
        elif old.kind not in (KIND_CHR, KIND_BLK):
            host.unlink(missing_ok=True)

    def resolve(self, path: str, what: str) -> str:
        """``path`` with the tree's symlinks to folders followed (as dpkg does when a package
        ships ``lib/`` where the rootfs has ``lib -> usr/lib``); the final name is not followed."""
        parts = path.split("/")
        done: list[str] = []
        hops = 0
        while len(parts) > 1:
            head = parts.pop(0)
            prefix = "/".join([*done, head])
            entry = self.entries.get(prefix)
            if entry is None or entry.kind != KIND_SYMLINK:
                done.append(head)
                continue
            hops += 1
            target = os.readlink(self._host(prefix))
            base = "" if target.startswith("/") else "/".join(done)
            joined = _norm(posixpath.join(base, target.lstrip("/")))
            if joined is None or hops > MAX_SYMLINK_HOPS:
                raise SourceError(
                    f"{what}: {path!r} goes through the symlink {prefix!r}, which "
                    "leaves the tree (refused)"
                )
            done = []
            parts = [*([p for p in joined.split("/") if p]), *parts]
        return "/".join([*done, *parts])

    def add(
        self,
        member: tarfile.TarInfo,
        data: Callable[[], object],
        what: str,
        follow: bool = False,
    ) -> None:
        path = _norm(member.name)
        if path is not None and follow and path:
            # a folder of the package over a symlink to a folder: the symlink stays
            path = _norm(self.resolve(path + "/." if member.isdir() else path, what))
        if path is None:
            raise SourceError(
                f"{what}: member {one_line(member.name, 200)!r} leaves the tree (refused)"
            )
        xattrs = _xattrs(member)
        meta = dict(
            mode=member.mode & 0o7777,
            uid=member.uid,
            gid=member.gid,
            mtime=float(member.mtime),
            xattrs=xattrs,
        )
        self.stats.entries += 1
        self.stats.xattrs += len(xattrs)
        if path == "":
            if member.isdir():
                root = self.entries[""]
                root.mode, root.uid, root.gid, root.mtime = (
                    meta["mode"],
                    meta["uid"],
                    meta["gid"],
                    meta["mtime"],
                )
                root.xattrs = xattrs
            return
        self._parents(path, what)
        host = self._host(path)
        if member.isdir():
            existing = self.entries.get(path)
            if existing is not None and existing.kind != KIND_DIR:
                self._clear(path)
            if path not in self.entries:
                os.mkdir(host, 0o700)
            self.entries[path] = Entry(path, KIND_DIR, **meta)  # type: ignore[arg-type]
            os.chmod(host, 0o700 | meta["mode"] & 0o777)  # type: ignore[operator]
            return
        self._clear(path)
        if member.isreg():
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                src = data()
                while True:
                    chunk = src.read(CHUNK_BYTES)  # type: ignore[attr-defined]
                    if not chunk:
                        break
                    out.write(chunk)
                    self.stats.bytes += len(chunk)
                os.fchmod(out.fileno(), 0o600 | member.mode & 0o7777)
            kind = KIND_FILE
            self.stats.files += 1
        elif member.issym():
            os.symlink(member.linkname, host)
            kind = KIND_SYMLINK
        elif member.islnk():
            target = _norm(member.linkname)
            entry = self.entries.get(target or "")
            if not target or entry is None or entry.kind != KIND_FILE:
                raise SourceError(
                    f"{what}: hard link {path!r} to {member.linkname!r}, which is "
                    "not a file of the tree (refused)"
                )
            os.link(self._host(target), host)
            self.entries[path] = Entry(
                path, KIND_HARDLINK, entry.mode, entry.uid, entry.gid, entry.mtime
            )
            return
        elif member.isfifo():
            os.mkfifo(host, 0o600 | member.mode & 0o777)
            kind = KIND_FIFO
        elif member.ischr() or member.isblk():
            kind = KIND_CHR if member.ischr() else KIND_BLK
            self.stats.devices += 1
            self.entries[path] = Entry(
                path, kind, major=member.devmajor, minor=member.devminor, **meta
            )  # type: ignore[arg-type]
            return
        else:
            return  # sockets and unknown types: nothing a disk image can hold
        self.entries[path] = Entry(path, kind, **meta)  # type: ignore[arg-type]

    def set_times(self) -> None:
        """mtimes as the tarball gives them, deepest first (a folder's own last)."""
        for path in sorted(self.entries, key=lambda p: p.count("/"), reverse=True):
            entry = self.entries[path]
            if entry.kind in (KIND_CHR, KIND_BLK, KIND_HARDLINK):
                continue
            with contextlib.suppress(OSError):
                os.utime(self._host(path), (entry.mtime, entry.mtime), follow_symlinks=False)


def unpack(
    staging: Staging,
    tarball: Path,
    what: str,
    follow: bool = False,
    log_every_s: float = PROGRESS_INTERVAL_S,
) -> None:
    """Unpack one tarball (any compression tarfile reads) over the staging tree; ``follow``:
    through the tree's symlinks to folders, as a package manager installs (overlays)."""
    last = time.monotonic()
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                staging.add(member, lambda m=member: tar.extractfile(m), what, follow)
                now = time.monotonic()
                if now - last >= log_every_s:
                    last = now
                    driverlog.info(
                        f"{what}: unpacked {staging.stats.entries} entries, "
                        f"{staging.stats.bytes >> 20} MiB"
                    )
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            from .errors import from_os_error

            raise from_os_error(exc, f"{what}: unpacking into {staging.root}") from None
        raise SourceError(
            f"{what}: not a valid tarball ({one_line(str(exc), 200) or type(exc).__name__})"
        ) from None


def _quote(path: str) -> str:
    return '"/' + path + '"'


def debugfs_script(staging: Staging, workdir: Path) -> tuple[list[str], int]:
    """The debugfs commands that give every entry its tarball metadata."""
    lines: list[str] = []
    unaddressable = 0
    for n, entry in enumerate(staging.entries.values()):
        if entry.kind == KIND_HARDLINK:
            continue
        if _UNSAFE_DEBUGFS_CHARS & set(entry.path):
            unaddressable += 1
            continue
        spec = _quote(entry.path) if entry.path else "/"
        host = staging._host(entry.path)
        if entry.kind in (KIND_CHR, KIND_BLK):
            parent, _, name = entry.path.rpartition("/")
            lines += [
                f"cd {_quote(parent) if parent else '/'}",
                f'mknod "{name}" {"c" if entry.kind == KIND_CHR else "b"} '
                f"{entry.major} {entry.minor}",
                "cd /",
            ]
            cur_mode, cur_uid, cur_gid = -1, -1, -1
            lines.append(f"sif {spec} mtime @{int(entry.mtime)}")
        else:
            st = os.lstat(host)
            cur_mode, cur_uid, cur_gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            if not entry.path:  # mke2fs -E root_owner gave the root its owner already
                cur_uid, cur_gid = entry.uid, entry.gid
        if entry.kind != KIND_SYMLINK and entry.mode != cur_mode:
            lines.append(f"sif {spec} mode 0{_TYPE_BITS[entry.kind] | entry.mode:o}")
        if entry.uid != cur_uid:
            lines.append(f"sif {spec} uid {entry.uid}")
        if entry.gid != cur_gid:
            lines.append(f"sif {spec} gid {entry.gid}")
        for i, (name, value) in enumerate(entry.xattrs.items()):
            if _UNSAFE_DEBUGFS_CHARS & set(name) or " " in name:
                continue
            value_file = workdir / f"xattr-{n}-{i}"
            value_file.write_bytes(value)
            lines.append(f"ea_set -f {value_file} {spec} {name}")
    return lines, unaddressable


def _run(argv: list[str], what: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TOOL_TIMEOUT_S,
            check=False,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
        )
    except OSError as exc:
        raise StorageError(f"{what}: cannot run {argv[0]} ({exc.strerror or exc})") from None
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what}: {argv[0]} ran past {TOOL_TIMEOUT_S:.0f} s") from None


def _tool_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def make_filesystem(staging: Staging, image: Path, spec: DiskSpec, what: str) -> None:
    """``mke2fs -d`` the staging tree into a new image file of ``spec.size_mb`` MiB."""
    with open(image, "wb") as fh:
        fh.truncate(spec.size_mb << 20)
    root = staging.entries[""]
    proc = _run(
        [
            find_tool("mke2fs") or "mke2fs",
            "-q",
            "-F",
            "-t",
            spec.filesystem,
            "-E",
            f"root_owner={root.uid}:{root.gid}",
            "-d",
            str(staging.root),
            str(image),
        ],
        what,
    )
    if proc.returncode != 0:
        text = (proc.stderr + proc.stdout).lower()
        if "could not allocate" in text or "no space" in text or "no free space" in text:
            raise StorageFullError(
                f"{what}: the rootfs ({staging.stats.bytes >> 20} MiB in "
                f"{staging.stats.entries} entries) does not fit a {spec.size_mb} MB "
                f"{spec.filesystem} file system: raise IMAGE_SIZE_MB of the marketplace"
            )
        raise StorageError(f"{what}: mke2fs failed: {one_line(_tool_error(proc), 300)}")


def apply_metadata(staging: Staging, image: Path, workdir: Path, what: str) -> None:
    lines, unaddressable = debugfs_script(staging, workdir)
    staging.stats.unaddressable = unaddressable
    if unaddressable:
        driverlog.warn(
            f"{what}: {unaddressable} entries with quotes, backslashes or control "
            "characters in their names keep the builder's owner and mode"
        )
    if not lines:
        return
    script = workdir / "debugfs.cmds"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    _debugfs(image, str(script), what, "set owners and modes")


def _debugfs(image: Path, source: str, what: str, task: str, commands: str | None = None) -> None:
    """``debugfs -w -f <source>`` on ``image`` (``-``: ``commands`` on stdin). debugfs exits 0
    after a failed command, so its complaints on stderr (all but its banner) are failures."""
    proc = _run([find_tool("debugfs") or "debugfs", "-w", "-f", source, str(image)], what, commands)
    problems = [
        ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")
    ]
    if proc.returncode != 0 or problems:
        raise StorageError(
            f"{what}: debugfs could not {task}: "
            f"{one_line(problems[0] if problems else _tool_error(proc), 300)}"
        )


def to_qcow2(raw: Path, out: Path, what: str) -> None:
    proc = _run(
        [
            find_tool("qemu-img") or "qemu-img",
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            str(raw),
            str(out),
        ],
        what,
    )
    if proc.returncode != 0:
        raise StorageError(f"{what}: qemu-img convert failed: {one_line(_tool_error(proc), 300)}")


@dataclass(frozen=True)
class Built:
    raw: Path
    root_uid: int
    root_gid: int
    stats: Stats


def build(tarballs: Iterable[tuple[Path, str]], spec: DiskSpec, workdir: Path, what: str) -> Built:
    """The raw disk image of the tarballs unpacked in order, built in ``workdir`` (then
    :func:`finish` gives it the asked format).

    ``tarballs`` are (path, label) pairs: the rootfs, then overlays such as the context package
    (unpacked through the rootfs' symlinks to folders, as its package manager would).
    """
    staging = Staging(workdir / "tree")
    for n, (tarball, label) in enumerate(tarballs):
        unpack(staging, tarball, label, follow=n > 0)
        if n == 0 and not staging.stats.files:
            raise SourceError(
                f"{label}: the tarball holds no file, refusing to build an empty disk"
            )
    staging.set_times()
    driverlog.info(
        f"{what}: building a {spec.size_mb} MB {spec.filesystem} file system from "
        f"{staging.stats.entries} entries ({staging.stats.bytes >> 20} MiB)"
    )
    raw = workdir / "disk.raw"
    make_filesystem(staging, raw, spec, what)
    apply_metadata(staging, raw, workdir, what)
    shutil.rmtree(staging.root, ignore_errors=True)
    root = staging.entries[""]
    return Built(raw, root.uid, root.gid, staging.stats)


def finish(raw: Path, spec: DiskSpec, what: str) -> Path:
    """The raw image in the asked format (qcow2: converted beside it, the raw one removed)."""
    if spec.format != "qcow2":
        return raw
    driverlog.info(f"{what}: converting to qcow2")
    out = raw.with_suffix(".qcow2")
    to_qcow2(raw, out, what)
    raw.unlink()
    return out


def set_root_owner(raw: Path, uid: int, gid: int, what: str) -> None:
    """Give the root folder back its owner (OpenNebula's root helper chowns it to oneadmin),
    in one debugfs run."""
    commands = f"sif / uid {uid}\nsif / gid {gid}\n"
    _debugfs(raw, "-", what, "reset the root folder's owner", commands)
