"""The http marketplace: appliances are files in PUBLIC_DIR, served by a web server at BASE_URL.

With BRIDGE_LIST the folder lives on storage hosts reached over ssh (one per app id, as
upstream); otherwise on this machine. Files get a random, flat name, so concurrent imports
never collide (upstream's md5 of "<epoch>:<id>" did). Delete derives the file from SOURCE and
refuses anything that would leave PUBLIC_DIR, on this machine or on the bridge host.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import driverlog
from ..action import App, Market
from ..bridge import available_hosts, host_for_app, hosts_in_turn, parse_bridge_list
from ..errors import (
    MarketError,
    RemoteError,
    StorageError,
    UnsafePathError,
    from_os_error,
    one_line,
)
from ..location import HttpLocation, url_parts
from ..progress import Progress
from ..transfer.local import sweep_temps, write_atomically
from ..transfer.remote import run_remote, write_remote_atomically
from ..transfer.sources import open_source
from ..units import MIB
from .attributes import Attr, read
from .base import (
    Backend,
    Check,
    Context,
    ImportRequest,
    ImportResult,
    MonitorResult,
    app_size_mb,
)

EXIT_MISSING = 10
EXIT_OUTSIDE = 11
EXIT_NOT_FILE = 12
EXIT_NO_FOLDER = 13
EXIT_NOT_WRITABLE = 14
EXIT_PROBE_FAILED = 15

CHECK_GET_TIMEOUT_S = 10.0
"""How long check waits for BASE_URL to serve the probe."""
CHECK_SSH_TIMEOUT_S = 30.0
"""How long check waits for a BRIDGE_LIST host (login included)."""
PROBE_BYTES = 64

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
TEMP_RE = re.compile(r"\.app-\d+-[0-9a-f]{32}\.part")
"""The temporary name of an import (``temp_name`` of ``HttpLocation.new_name``), nothing else."""


def _base_url(text: str) -> str:
    parts = url_parts(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, not {one_line(text, 100)!r}")
    return text.rstrip("/")


def _public_dir(text: str) -> PurePosixPath:
    folder = PurePosixPath(text)
    if not folder.is_absolute() or ".." in folder.parts:
        raise ValueError(f"must be an absolute path without '..', not {text[:100]!r}")
    return folder


ATTRIBUTES = (
    Attr("BASE_URL", "public URL at which the web server serves PUBLIC_DIR", required=True,
         parse=_base_url),
    Attr("PUBLIC_DIR", "folder holding the appliance files", required=True, parse=_public_dir),
    Attr("BRIDGE_LIST", "hosts holding PUBLIC_DIR, reached over ssh (default: this one)",
         parse=parse_bridge_list),
)  # fmt: skip


@dataclass(frozen=True)
class HttpFolderConfig:
    """The market attributes this driver reads, checked once."""

    base_url: str
    public_dir: PurePosixPath
    bridge_list: list[str]

    @classmethod
    def from_market(cls, market: Market) -> HttpFolderConfig:
        v = read(market, ATTRIBUTES)
        return cls(v["BASE_URL"], v["PUBLIC_DIR"], v["BRIDGE_LIST"] or [])

    def source_for(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


class HttpFolderBackend(Backend):
    """import, delete and monitor for ``MARKET_MAD=http``."""

    driver = "http"
    attributes = ATTRIBUTES

    def __init__(self, market: Market, context: Context) -> None:
        super().__init__(market, context)
        self.config = HttpFolderConfig.from_market(market)

    # import -----------------------------------------------------------------------------

    def import_app(self, request: ImportRequest) -> ImportResult:
        cfg = self.config
        info = request.source
        name = HttpLocation.new_name(request.app.id)
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
                    expected_md5=request.expected_md5,
                    progress=progress,
                ).digests
            else:
                driverlog.info(f"writing app {request.app.id} to {host}:{cfg.public_dir}")
                digests = write_remote_atomically(
                    host,
                    str(cfg.public_dir),
                    name,
                    src,
                    expected_md5=request.expected_md5,
                    progress=progress,
                )
        info = request.exported()
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
        except FileNotFoundError:
            raise StorageError(f"PUBLIC_DIR {folder} does not exist") from None
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

    def delete_app(self, app: App) -> bool:
        cfg = self.config
        if not app.source.strip():
            driverlog.warn(f"app {app.id} has no SOURCE (its import failed?): nothing to delete")
            return False
        rel = HttpLocation.parse(app.source, cfg.base_url).path
        if cfg.bridge_list:
            hosts = available_hosts(cfg.bridge_list)
            return self._delete_remote(host_for_app(hosts, app.id), rel)
        return self._delete_local(rel)

    def _delete_local(self, rel: PurePosixPath) -> bool:
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
            return False
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
            return False
        except OSError as exc:
            raise from_os_error(exc, f"cannot delete {rel} from {folder}") from None
        return True

    def _delete_remote(self, host: str, rel: PurePosixPath) -> bool:
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
                return False
            if code == EXIT_OUTSIDE:
                raise UnsafePathError(
                    f"{rel} on {host} resolves outside PUBLIC_DIR {folder}: refused"
                ) from None
            if code == EXIT_NOT_FILE:
                raise StorageError(f"{rel} in {host}:{folder} is not a file: not deleted") from None
            if code == EXIT_NO_FOLDER:
                raise StorageError(f"PUBLIC_DIR {folder} does not exist on {host}") from None
            raise
        return True

    # check ------------------------------------------------------------------------------

    def check(self) -> Iterator[Check]:
        """PUBLIC_DIR takes a probe file (on each BRIDGE_LIST host) and BASE_URL serves it."""
        hosts = self.config.bridge_list
        if not hosts:
            yield from self._check_local_probe()
            return
        from ..oneclient import usable_hosts

        states = usable_hosts(hosts)
        if states is not None:
            skipped = [h for h in hosts if h not in states]
            if len(skipped) == len(hosts):
                yield Check(
                    "oned hosts", False, "every BRIDGE_LIST host is disabled, offline or in error"
                )
            elif skipped:
                yield Check("oned hosts", True, f"imports skip {', '.join(skipped)} (oned state)")
            else:
                yield Check(
                    "oned hosts", True, "no BRIDGE_LIST host is disabled, offline or in error"
                )
        for host in hosts:
            yield from self._check_remote_probe(host)

    def _check_local_probe(self) -> Iterator[Check]:
        try:
            folder = self._check_local_folder(writable=True)
        except StorageError as exc:
            yield Check("PUBLIC_DIR", False, str(exc))
            return
        name, data = _probe()
        path = folder / name
        try:
            try:
                path.write_bytes(data)
                path.chmod(0o644)
            except OSError as exc:
                detail = str(from_os_error(exc, f"writing a probe to {folder}"))
                yield Check("PUBLIC_DIR", False, detail)
                return
            yield Check("PUBLIC_DIR", True, f"{folder} exists and is writable")
            yield self._check_served(name, data, str(folder))
        finally:
            path.unlink(missing_ok=True)

    def _check_remote_probe(self, host: str) -> Iterator[Check]:
        """One ssh session logs in, checks the folder and writes the probe (ssh is slow to open)."""
        name, data = _probe()
        folder = self.config.public_dir
        q = shlex.quote(str(folder))
        script = (
            f"test -d {q} || exit {EXIT_NO_FOLDER}; test -w {q} || exit {EXIT_NOT_WRITABLE}; "
            f"umask 022; printf %s {data.decode()} > {q}/{name} || exit {EXIT_PROBE_FAILED}"
        )
        why = {
            EXIT_NO_FOLDER: "does not exist",
            EXIT_NOT_WRITABLE: "is not writable by the ssh user",
        }
        failure = ""
        try:
            run_remote(host, script, timeout_s=CHECK_SSH_TIMEOUT_S)
        except RemoteError as exc:  # ssh itself: connection, login, time limit
            # a time limit may come after the printf wrote the (publicly served) probe
            with contextlib.suppress(MarketError):
                run_remote(host, f"rm -f -- {q}/{name}", timeout_s=CHECK_SSH_TIMEOUT_S)
            yield Check(f"ssh {host}", False, f"ssh failed ({exc})")
            return
        except StorageError as exc:  # the script's exit status
            failure = why.get(_exit_code(exc) or 0, f"probe write failed ({exc})")
        yield Check(f"ssh {host}", True, "reachable (BatchMode)")
        try:
            if failure:
                yield Check(f"PUBLIC_DIR on {host}", False, f"{folder} {failure}")
                return
            yield Check(f"PUBLIC_DIR on {host}", True, f"{folder} exists and is writable")
            yield self._check_served(name, data, f"{host}:{folder}")
        finally:
            with contextlib.suppress(MarketError):
                run_remote(host, f"rm -f -- {q}/{name}", timeout_s=CHECK_SSH_TIMEOUT_S)

    def _check_served(self, name: str, data: bytes, where: str) -> Check:
        import requests

        url = self.config.source_for(name)
        try:
            with requests.get(url, timeout=CHECK_GET_TIMEOUT_S, stream=True) as resp:
                body = resp.raw.read(len(data) + 1, decode_content=True)
                status = resp.status_code
        except requests.RequestException as exc:
            from ..web import describe_request_error

            return Check("BASE_URL", False, f"GET {url}: {describe_request_error(exc)}")
        if status != 200:
            return Check(
                "BASE_URL",
                False,
                f"a probe written to {where} is not served at {url} (HTTP {status}); "
                "BASE_URL must be the URL of PUBLIC_DIR",
            )
        if body != data:
            return Check(
                "BASE_URL", False, f"{url} answers, but not with the probe written to {where}"
            )
        return Check("BASE_URL", True, f"serves {where}")

    # monitor ----------------------------------------------------------------------------

    def monitor(self) -> MonitorResult:
        cfg = self.config
        if not cfg.bridge_list:
            folder = self._check_local_folder(writable=False)
            try:
                st = os.statvfs(folder)
            except OSError as exc:
                raise from_os_error(exc, f"cannot read the size of PUBLIC_DIR {folder}") from None
            # PUBLIC_DIR holds the administrator's files too: only our exact names go
            sweep_temps(
                folder, ".app-", max_age_s=STALE_TEMP_S, left_by="a killed import", name_re=TEMP_RE
            )
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


def _probe() -> tuple[str, bytes]:
    """A random probe file name and content (hex, so no server rewrites it)."""
    return f"onemarket-check-{secrets.token_hex(8)}", secrets.token_hex(PROBE_BYTES // 2).encode()


def _sizes(block: int, total: int, free: int, avail: int) -> MonitorResult:
    """MB as ``df`` shows them: used excludes reserved blocks, free is what users may fill."""
    return MonitorResult(
        used_mb=(total - free) * block // MIB,
        free_mb=avail * block // MIB,
        total_mb=total * block // MIB,
    )


def _exit_code(exc: Exception) -> int | None:
    return getattr(exc, "exit_code", None)
