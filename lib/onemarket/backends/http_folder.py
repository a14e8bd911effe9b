"""The http marketplace: appliances are files in PUBLIC_DIR, served by a web server at BASE_URL.

With BRIDGE_LIST the folder lives on storage hosts reached over ssh (one per app id, as
upstream); otherwise on this machine. Files get a random, flat name, so concurrent imports
never collide (upstream's md5 of "<epoch>:<id>" did). Delete derives the file from SOURCE and
refuses anything that would leave PUBLIC_DIR, on this machine or on the bridge host.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .. import driverlog
from ..action import App, Market
from ..bridge import available_hosts, host_for_app, hosts_in_turn, parse_bridge_list
from ..errors import ConfigError, RemoteError, StorageError, UnsafePathError, from_os_error
from ..location import HttpLocation
from ..progress import Progress
from ..transfer.interrupt import Deadline
from ..transfer.local import write_atomically
from ..transfer.remote import run_remote, write_remote_atomically
from ..transfer.sources import open_source
from .base import (
    Backend,
    Context,
    ImportRequest,
    ImportResult,
    MonitorResult,
    app_size_mb,
)

MIB = 1 << 20

EXIT_MISSING = 10
EXIT_OUTSIDE = 11
EXIT_NOT_FILE = 12
EXIT_NO_FOLDER = 13

_DELETE_SCRIPT = """d={dir}; p={path}
[ -d "$d" ] || exit {no_folder}
root=$(realpath -e -- "$d") || exit {no_folder}
[ -e "$p" ] || [ -L "$p" ] || exit {missing}
parent=$(realpath -e -- "$(dirname -- "$p")") || exit {outside}
target=$(realpath -m -- "$p") || exit {outside}
case "$parent/" in "$root"/*) ;; *) exit {outside} ;; esac
case "$target" in "$root"/*) ;; *) exit {outside} ;; esac
if [ -L "$p" ] || [ -f "$p" ]; then rm -f -- "$p"; else exit {not_file}; fi
"""

_MONITOR_SCRIPT = """d={dir}
[ -d "$d" ] || exit {no_folder}
stat -f -c '%S %b %f %a' -- "$d"
find "$d" -maxdepth 1 -type f -name '.app-[0-9]*-*.part' -mmin +{stale_min} -delete \
    2>/dev/null || true
"""

STALE_TEMP_S = 24 * 3600
"""Age after which a temporary file of ours is a leftover (its import was SIGKILLed or its
host unreachable at clean-up) and monitor removes it; no import runs that long."""
_TEMP_RE = re.compile(r"\.app-\d+-[0-9a-f]{32}\.part")


@dataclass(frozen=True)
class HttpFolderConfig:
    """The market attributes this driver reads, checked once."""

    base_url: str
    public_dir: PurePosixPath
    bridge_list: list[str]

    @classmethod
    def from_market(cls, market: Market) -> HttpFolderConfig:
        base_url, public_dir = market.require("BASE_URL", "PUBLIC_DIR")
        parts = urlsplit(base_url.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"marketplace '{market.name}': BASE_URL must be an http(s) URL, "
                f"not {base_url[:100]!r}"
            )
        folder = PurePosixPath(public_dir.strip())
        if not folder.is_absolute() or ".." in folder.parts:
            raise ConfigError(
                f"marketplace '{market.name}': PUBLIC_DIR must be an absolute path without '..', "
                f"not {public_dir[:100]!r}"
            )
        return cls(
            base_url=base_url.strip().rstrip("/"),
            public_dir=folder,
            bridge_list=parse_bridge_list(market.attr("BRIDGE_LIST")),
        )

    def source_for(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


class HttpFolderBackend(Backend):
    """import, delete and monitor for ``MARKET_MAD=http``."""

    driver = "http"

    def __init__(self, market: Market, context: Context) -> None:
        super().__init__(market, context)
        self.config = HttpFolderConfig.from_market(market)

    # import -----------------------------------------------------------------------------

    def import_app(self, request: ImportRequest) -> ImportResult:
        cfg = self.config
        info = request.source
        name = HttpLocation.new_name(request.app.id)
        deadline = Deadline(self.context.timeout_s, f"import of app {request.app.id}")
        host = None
        if cfg.bridge_list:
            host = host_for_app(available_hosts(cfg.bridge_list), request.app.id)
        else:
            self._check_local_folder(writable=True)
        with open_source(info.source, self.context.installation) as src:
            progress = Progress(src.size_bytes, self.context.progress)
            if host is None:
                digests = write_atomically(
                    src,
                    Path(cfg.public_dir),
                    name,
                    expected_md5=info.md5,
                    progress=progress,
                    deadline=deadline,
                ).digests
            else:
                driverlog.info(f"writing app {request.app.id} to {host}:{cfg.public_dir}")
                digests = write_remote_atomically(
                    host,
                    str(cfg.public_dir),
                    name,
                    src,
                    expected_md5=info.md5,
                    progress=progress,
                    deadline=deadline,
                )
        return ImportResult(
            source=cfg.source_for(name),
            md5=digests.md5,
            size_mb=app_size_mb(info, digests.size_bytes),
            format=info.format or request.app.format or "raw",
            sha256=digests.sha256,
        )

    def _check_local_folder(self, writable: bool) -> Path:
        folder = Path(self.config.public_dir)
        try:
            st = folder.stat()
        except OSError as exc:
            raise from_os_error(exc, f"PUBLIC_DIR {folder}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"PUBLIC_DIR {folder} is not a folder")
        mode = os.W_OK | os.X_OK if writable else os.R_OK | os.X_OK
        if not os.access(folder, mode):
            what = "writable" if writable else "readable"
            raise StorageError(f"PUBLIC_DIR {folder} is not {what} by the driver's user")
        return folder

    # delete -----------------------------------------------------------------------------

    def delete_app(self, app: App) -> None:
        cfg = self.config
        if not app.source.strip():
            driverlog.warn(f"app {app.id} has no SOURCE (its import failed?): nothing to delete")
            return
        rel = HttpLocation.parse(app.source, cfg.base_url).path
        if cfg.bridge_list:
            hosts = available_hosts(cfg.bridge_list)
            self._delete_remote(host_for_app(hosts, app.id), rel)
        else:
            self._delete_local(rel)

    def _delete_local(self, rel: PurePosixPath) -> None:
        folder = self._check_local_folder(writable=True)
        root = os.path.realpath(folder)
        path = os.path.join(root, *rel.parts)
        parent = os.path.realpath(os.path.dirname(path))
        if parent != root and not _inside(parent, root):
            raise UnsafePathError(f"{rel} is in a folder outside PUBLIC_DIR {folder}: refused")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            driverlog.warn(f"{rel} is not in PUBLIC_DIR {folder}: nothing to delete")
            return
        except OSError as exc:
            raise from_os_error(exc, f"cannot delete {rel} from {folder}") from None
        if stat.S_ISLNK(st.st_mode) and not _inside(os.path.realpath(path), root):
            raise UnsafePathError(f"{rel} is a symbolic link leading out of PUBLIC_DIR: refused")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise StorageError(f"{rel} in PUBLIC_DIR {folder} is not a file: not deleted")
        try:
            os.unlink(path)
        except FileNotFoundError:
            driverlog.warn(f"{rel} vanished from PUBLIC_DIR {folder} before deletion")
        except OSError as exc:
            raise from_os_error(exc, f"cannot delete {rel} from {folder}") from None

    def _delete_remote(self, host: str, rel: PurePosixPath) -> None:
        folder = str(self.config.public_dir)
        script = _DELETE_SCRIPT.format(
            dir=shlex.quote(folder),
            path=shlex.quote(posixpath.join(folder, str(rel))),
            no_folder=EXIT_NO_FOLDER,
            missing=EXIT_MISSING,
            outside=EXIT_OUTSIDE,
            not_file=EXIT_NOT_FILE,
        )
        try:
            run_remote(host, script)
        except (StorageError, RemoteError) as exc:
            code = _exit_code(exc)
            if code == EXIT_MISSING:
                driverlog.warn(f"{rel} is not in {host}:{folder}: nothing to delete")
                return
            if code == EXIT_OUTSIDE:
                raise UnsafePathError(
                    f"{rel} on {host} resolves outside PUBLIC_DIR {folder}: refused"
                ) from None
            if code == EXIT_NOT_FILE:
                raise StorageError(f"{rel} in {host}:{folder} is not a file: not deleted") from None
            if code == EXIT_NO_FOLDER:
                raise StorageError(f"PUBLIC_DIR {folder} does not exist on {host}") from None
            raise

    # monitor ----------------------------------------------------------------------------

    def monitor(self) -> MonitorResult:
        cfg = self.config
        if not cfg.bridge_list:
            folder = self._check_local_folder(writable=False)
            try:
                st = os.statvfs(folder)
            except OSError as exc:
                raise from_os_error(exc, f"cannot read the size of PUBLIC_DIR {folder}") from None
            _remove_stale_temps(folder)
            return _sizes(st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail)
        hosts = available_hosts(cfg.bridge_list)
        last: Exception | None = None
        for host in hosts_in_turn(hosts, 0):
            try:
                return self._monitor_remote(host)
            except RemoteError as exc:
                driverlog.warn(str(exc))
                last = exc
        assert last is not None
        raise last

    def _monitor_remote(self, host: str) -> MonitorResult:
        folder = str(self.config.public_dir)
        script = _MONITOR_SCRIPT.format(
            dir=shlex.quote(folder), no_folder=EXIT_NO_FOLDER, stale_min=STALE_TEMP_S // 60
        )
        try:
            out = run_remote(host, script)
        except StorageError as exc:
            if _exit_code(exc) == EXIT_NO_FOLDER:
                raise StorageError(f"PUBLIC_DIR {folder} does not exist on {host}") from None
            raise
        # statvfs fields: fundamental block size, total blocks, free blocks, available blocks
        try:
            block, total, free, avail = (int(f) for f in out.split())
        except ValueError:
            raise RemoteError(f"cannot read filesystem sizes from {host}: {out[:100]!r}") from None
        return _sizes(block, total, free, avail)


def _remove_stale_temps(folder: Path) -> None:
    """Remove our own temporary files older than STALE_TEMP_S (best effort, never fails)."""
    limit = time.time() - STALE_TEMP_S
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not _TEMP_RE.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                os.unlink(entry.path)
                driverlog.info(f"removed leftover temporary file {entry.name} from {folder}")
        except OSError:
            continue


def _sizes(block: int, total: int, free: int, avail: int) -> MonitorResult:
    """MB as ``df`` shows them: used excludes reserved blocks, free is what users may fill."""
    return MonitorResult(
        used_mb=(total - free) * block // MIB,
        free_mb=avail * block // MIB,
        total_mb=total * block // MIB,
    )


def _exit_code(exc: Exception) -> int | None:
    return getattr(exc, "exit_code", None)
