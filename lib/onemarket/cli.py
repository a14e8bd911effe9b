"""``one-market``: check, list, push to and remove from a marketplace, with the drivers' code.

MARKET is a template file (``NAME``, ``MARKET_MAD`` and the driver attributes, OpenNebula
syntax) or the id or name of a marketplace of the oned found through ``ONE_XMLRPC`` and
``ONE_AUTH``. Every action goes through :func:`onemarket.registry.load_backend`, so what works
here works in oned. Failures are one line on stderr and exit status 1; ``--debug`` adds the
traceback and the drivers' DEBUG lines. Exit status 2 is a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from . import __version__, driverlog, oneclient
from .action import APP_TYPE_IMAGE, App, ImportInfo, Market
from .backends.base import AppEntry, Backend, Context, ImportRequest, ImportResult, MonitorResult
from .bridge import parse_bridge_list
from .errors import ConfigError, MarketError, SourceError, from_os_error, one_line
from .installation import Installation
from .markets import PUBLIC_DRIVERS, load_market, missing_attrs
from .progress import ProgressEvent, human_bytes
from .registry import DRIVERS, backend_class, load_backend
from .transfer.sources import ssh_argv

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

PROBE_TIMEOUT_S = 10.0
"""Bound on the GET of the probe file at BASE_URL (connect and read)."""
SSH_CHECK_TIMEOUT_S = 30.0
"""Bound on each ssh command run by ``check`` (login plus a trivial command)."""
S3_CHECK_CONNECT_TIMEOUT_S = 5.0
S3_CHECK_READ_TIMEOUT_S = 20.0
S3_CHECK_ATTEMPTS = 2
"""``check`` asks S3 quickly and retries little: it diagnoses, it does not insist."""
PROBE_BYTES = 64
"""Size of the random probe file written to PUBLIC_DIR (read back whole, bounded)."""
BAR_INTERVAL_S = 0.2
"""Redraw period of the terminal progress bar."""
SNIFF_BYTES = 512
"""Header bytes read to tell the image format of a pushed file."""
NAME_COLUMN_MAX_CHARS = 60
"""Widest NAME column of the ``apps`` table (longer names are cut; ``--json`` has them whole)."""
MB = 1024 * 1024
SSH_FAILED = 255
"""Exit status of ssh itself failing (connection, authentication, host key)."""
SSH_TIMED_OUT = -1
SSH_NOT_RUN = -2


# ---------------------------------------------------------------------------- output helpers


def printable(text: object) -> str:
    """One line without control characters (catalog text must not drive the terminal)."""
    s = driverlog.scrub(str(text))
    return "".join(ch if ch.isprintable() else " " for ch in s).strip()


def emit_json(data: object) -> None:
    sys.stdout.write(driverlog.scrub(json.dumps(data, indent=2, ensure_ascii=False)) + "\n")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr while driver code runs, so stray output never mixes with ours."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class CliInstallation(Installation):
    """The installation, with catalog caches in the user's own folder unless they own var.

    An administrator running ``one-market`` as root must not leave root-owned files in the
    cache the MAD (oneadmin) keeps updating.
    """

    @property
    def cache_dir(self) -> Path:
        try:
            owner: int | None = self.var_dir.stat().st_uid
        except OSError:
            owner = None
        if owner == os.geteuid():
            return super().cache_dir
        xdg = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
        folder = Path(xdg) / "onemarket"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, f"cache folder {folder}") from None
        return folder


def installation() -> Installation:
    base = Installation.detect()
    return CliInstallation(base.one_location, base.remotes, base.var_dir, base.mads_dir)


def context(progress: Any = None) -> Context:
    return Context(installation=installation(), progress=progress)


_APP_ID_RE = re.compile(r"^(?:app|marketapp)-(\d{1,18})(?:-|$)")


def app_id_from_source(source: str) -> int:
    """The app id our drivers put in a SOURCE's last component (``app-<id>-...``,
    ``marketapp-<id>``), or -1. With BRIDGE_LIST the id picks the host holding the file."""
    m = _APP_ID_RE.match(source.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------------------- check


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {printable(self.detail)}"


class Checker:
    """Runs the checks of one market, printing each line as soon as it is known."""

    def __init__(self, market: Market, context: Context, echo: bool) -> None:
        self.market = market
        self.context = context
        self.echo = echo
        self.checks: list[Check] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        check = Check(name, ok, one_line(driverlog.scrub(detail), 400))
        self.checks.append(check)
        if self.echo:
            print(check.line(), flush=True)
        return ok

    def attempt(self, name: str, action: Callable[[], str]) -> bool:
        """Run ``action`` (returns the detail); a MarketError becomes a failed check."""
        try:
            detail = action()
        except MarketError as exc:
            return self.add(name, False, str(exc))
        return self.add(name, True, detail)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def run(self) -> None:
        market = self.market
        if market.driver not in DRIVERS:
            known = ", ".join(DRIVERS)
            self.add("driver", False, f"unknown MARKET_MAD '{market.driver}' (known: {known})")
            return
        try:
            backend_class(market.driver)
        except MarketError as exc:
            self.add("driver", False, str(exc))
            return
        self.add("driver", True, f"MARKET_MAD={market.driver}")
        missing = missing_attrs(market)
        if missing:
            self.add("attributes", False, f"missing required {', '.join(missing)}")
            return
        self.add("attributes", True, "required attributes set")
        if market.driver == "http":
            self.check_http()
        elif market.driver == "s3":
            self.check_s3()
        self.check_monitor()

    def backend(self) -> Backend:
        return load_backend(self.market.driver, self.market, self.context)

    def check_monitor(self) -> None:
        def monitor() -> str:
            with stdout_to_stderr():
                result = self.backend().monitor()
            usage = f"USED_MB={result.used_mb} FREE_MB={result.free_mb} TOTAL_MB={result.total_mb}"
            if self.market.driver in PUBLIC_DRIVERS:
                if not result.apps:
                    raise ConfigError("the catalog answered but lists no apps")
                return f"catalog answered, {len(result.apps)} apps"
            return usage

        self.attempt("monitor", monitor)

    # -- http

    def check_http(self) -> None:
        public_dir = self.market.attrs["PUBLIC_DIR"].strip()
        base_url = self.market.attrs["BASE_URL"].strip()
        if not base_url.startswith(("http://", "https://")):
            self.add("BASE_URL", False, f"BASE_URL must be an http(s) URL, not {base_url!r}")
            return
        try:
            hosts = parse_bridge_list(self.market.attr("BRIDGE_LIST"))
        except MarketError as exc:
            self.add("BRIDGE_LIST", False, str(exc))
            return
        if not hosts:
            self.check_local_dir(public_dir, base_url)
            return
        states = oneclient.usable_hosts(hosts)
        if states is not None:
            skipped = [h for h in hosts if h not in states]
            if len(skipped) == len(hosts):
                self.add(
                    "oned hosts", False, "every BRIDGE_LIST host is disabled, offline or in error"
                )
            elif skipped:
                self.add("oned hosts", True, f"imports skip {', '.join(skipped)} (oned state)")
            else:
                self.add("oned hosts", True, "no BRIDGE_LIST host is disabled, offline or in error")
        for host in hosts:
            self.check_remote_dir(host, public_dir, base_url)

    def check_local_dir(self, public_dir: str, base_url: str) -> None:
        folder = Path(public_dir)
        if not folder.is_dir():
            what = "is not a directory" if folder.exists() else "does not exist"
            self.add("PUBLIC_DIR", False, f"{public_dir} {what}")
            return
        if not os.access(folder, os.W_OK | os.X_OK):
            self.add("PUBLIC_DIR", False, f"{public_dir} is not writable by this user")
            return
        name, data = probe()
        path = folder / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self.add(
                "PUBLIC_DIR", False, str(from_os_error(exc, f"writing a probe to {public_dir}"))
            )
            with contextlib.suppress(OSError):
                path.unlink()
            return
        try:
            self.add("PUBLIC_DIR", True, f"{public_dir} exists and is writable")
            self.check_served(base_url, name, data, public_dir)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def check_remote_dir(self, host: str, public_dir: str, base_url: str) -> None:
        """One ssh session logs in, checks the folder and writes the probe (ssh is slow to open)."""
        name, data = probe()
        q = shell_quote(public_dir)
        script = (
            f"test -d {q} || exit 3; test -w {q} || exit 4; umask 022; cat > {q}/{name} || exit 5"
        )
        code, err = run_ssh(host, script, data)
        if code in (SSH_FAILED, SSH_TIMED_OUT, SSH_NOT_RUN):
            self.add(f"ssh {host}", False, f"ssh failed ({err or f'exit {code}'})")
            return
        self.add(f"ssh {host}", True, "reachable (BatchMode)")
        label = f"PUBLIC_DIR on {host}"
        if code != 0:
            why = {3: "does not exist", 4: "is not writable by the ssh user"}.get(
                code, f"probe write failed ({err or f'exit {code}'})"
            )
            self.add(label, False, f"{public_dir} {why}")
            if code == 5:
                run_ssh(host, f"rm -f -- {q}/{name}")
            return
        try:
            self.add(label, True, f"{public_dir} exists and is writable")
            self.check_served(base_url, name, data, f"{host}:{public_dir}")
        finally:
            run_ssh(host, f"rm -f -- {q}/{name}")

    def check_served(self, base_url: str, name: str, data: bytes, where: str) -> None:
        url = base_url.rstrip("/") + "/" + name
        label = "BASE_URL"
        try:
            with requests.get(url, timeout=PROBE_TIMEOUT_S, stream=True) as resp:
                body = resp.raw.read(len(data) + 1, decode_content=True)
                status = resp.status_code
        except requests.RequestException as exc:
            from .web import describe_request_error

            self.add(label, False, f"GET {url}: {describe_request_error(exc)}")
            return
        if status != 200:
            self.add(
                label,
                False,
                f"a probe written to {where} is not served at {url} (HTTP {status}); "
                "BASE_URL must be the URL of PUBLIC_DIR",
            )
        elif body != data:
            self.add(label, False, f"{url} answers, but not with the probe written to {where}")
        else:
            self.add(label, True, f"serves {where}")

    # -- s3

    def check_s3(self) -> None:
        from . import s3config

        try:
            settings = s3config.S3Settings.from_market(self.market)
            client = s3config.make_client(
                settings,
                connect_timeout_s=S3_CHECK_CONNECT_TIMEOUT_S,
                read_timeout_s=S3_CHECK_READ_TIMEOUT_S,
                max_attempts=S3_CHECK_ATTEMPTS,
            )
        except MarketError as exc:
            self.add("S3 settings", False, str(exc))
            return
        where = settings.where
        bucket = settings.bucket
        if not self.s3_credentials(client, s3config, where):
            return
        if not self.s3_bucket(client, s3config, settings):
            return
        # under the app prefix, so that the monitor's clean-up of stale uploads covers it
        prefix = (self.market.attr("APP_PREFIX") or "marketapp").strip()
        key = f"{prefix}-onemarket-check-{secrets.token_hex(8)}"

        def multipart() -> str:
            try:
                upload = client.create_multipart_upload(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - botocore raises many types
                raise s3config.s3_error(exc, f"multipart upload to s3://{bucket}", where) from None
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            except Exception as exc:  # noqa: BLE001
                err = s3config.s3_error(exc, f"abort of test upload s3://{bucket}/{key}", where)
                raise type(err)(f"{err} (monitors abort it after a day)") from None
            return "a multipart upload can be created and aborted"

        self.attempt("multipart", multipart)

    def s3_credentials(self, client: Any, s3config: Any, where: str) -> bool:
        try:
            client.list_buckets()
        except Exception as exc:  # noqa: BLE001 - classified by s3config
            code = s3config.client_error_code(exc)
            if code in {"AccessDenied", "403"}:
                return self.add("credentials", True, f"accepted by {where} (listing not allowed)")
            return self.add("credentials", False, str(s3config.s3_error(exc, "login", where)))
        return self.add("credentials", True, f"accepted by {where}")

    def s3_bucket(self, client: Any, s3config: Any, settings: Any) -> bool:
        bucket = settings.bucket
        label = "bucket"
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - classified by s3config
            if s3config.client_error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                err = s3config.s3_error(exc, f"bucket {bucket}", settings.where)
                return self.add(label, False, str(err))
        else:
            return self.add(label, True, f"{bucket} reachable")
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if settings.aws and settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.region}
        try:
            client.create_bucket(**kwargs)
        except Exception as exc:  # noqa: BLE001
            if s3config.client_error_code(exc) == "BucketAlreadyOwnedByYou":
                return self.add(label, True, f"{bucket} reachable")
            err = s3config.s3_error(
                exc, f"bucket {bucket} is missing and creating it", settings.where
            )
            return self.add(label, False, str(err))
        return self.add(label, True, f"{bucket} was missing and has been created (as imports do)")


def probe() -> tuple[str, bytes]:
    """A random probe file name and content (hex, so no server rewrites it)."""
    return f"onemarket-check-{secrets.token_hex(8)}", secrets.token_hex(PROBE_BYTES // 2).encode()


def shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def run_ssh(host: str, command: str, data: bytes = b"") -> tuple[int, str]:
    """Run ``command`` on ``host`` like the http backend does; (exit code, one-line stderr)."""
    try:
        proc = subprocess.run(
            ssh_argv(host, command),
            input=data,
            capture_output=True,
            timeout=SSH_CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return SSH_TIMED_OUT, f"no answer within {SSH_CHECK_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return SSH_NOT_RUN, f"cannot run ssh ({exc.strerror or exc})"
    return proc.returncode, one_line(proc.stderr.decode("utf-8", "replace"), 300)


# ---------------------------------------------------------------------------- push


class TerminalBar:
    """Progress callback drawing one self-overwriting line on a terminal (stderr)."""

    interval_s = BAR_INTERVAL_S

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr

    def __call__(self, event: ProgressEvent) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        text = event.describe()
        pct = event.percent
        room = width - len(self.label) - len(text) - 6
        bar = ""
        if pct is not None and room >= 10:
            cells = min(room, 40)
            full = int(cells * pct / 100)
            bar = "[" + "#" * full + "." * (cells - full) + "] "
        line = f"{self.label} {bar}{text}"[: max(width - 1, 10)]
        self.stream.write("\r" + line.ljust(max(width - 1, 10)) + ("\n" if event.final else ""))
        self.stream.flush()


def sniff_format(path: Path) -> str:
    """The image format of a file from its header, as OpenNebula names it (raw by default).

    Only regular files and block devices are read: a pipe's header would be consumed.
    """
    try:
        mode = path.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return "raw"
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError:
        return "raw"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"conectix"):
        return "vpc"
    if len(head) >= 0x48 and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    return "raw"


def default_app_id() -> int:
    """Id of an app pushed from the command line: the current time in milliseconds.

    oned numbers apps from 0 upwards, so such an id (about 1.8e12) never names one of its apps;
    the s3 key ``marketapp-<id>`` and the http host choice stay those of the same scheme.
    """
    return int(time.time() * 1000)


def push(
    market: Market, file: str, name: str | None, app_id: int | None, fmt: str | None, progress: bool
) -> tuple[App, ImportResult]:
    """Import a local file (or block device, or pipe) through the market's backend."""
    path = Path(file)
    try:
        st = path.stat()
    except OSError as exc:
        raise SourceError(f"cannot read {file}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise SourceError(f"{file} is a directory, not an image file")
    if not os.access(path, os.R_OK):
        raise SourceError(f"cannot read {file}: permission denied")
    size_mb = max(1, math.ceil(st.st_size / MB)) if st.st_size else 0
    image_format = fmt or sniff_format(path)
    app = App(
        id=default_app_id() if app_id is None else app_id,
        name=name or path.name,
        size_mb=size_mb,
        format=image_format,
        type=APP_TYPE_IMAGE,
    )
    info = ImportInfo(source=str(path.resolve()), size_mb=size_mb, format=image_format)
    callback = TerminalBar(f"push {app.name}") if progress else None
    backend = load_backend(market.driver, market, context(callback))
    with stdout_to_stderr():
        result = backend.import_app(ImportRequest(app=app, source=info))
    return app, result


# ---------------------------------------------------------------------------- apps

APP_COLUMNS = ("NAME", "VERSION", "TYPE", "ARCH", "HYPERVISOR", "SIZE", "FORMAT")


def app_row(app: AppEntry) -> tuple[str, ...]:
    size = "-" if app.size_mb is None else human_bytes(app.size_mb * MB)
    name = printable(app.name)
    if len(name) > NAME_COLUMN_MAX_CHARS:
        name = name[: NAME_COLUMN_MAX_CHARS - 3] + "..."
    fields = (name, app.version, app.type, app.architecture, app.hypervisor, size, app.format)
    return tuple(printable(f) or "-" for f in fields)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [APP_COLUMNS, *rows]) for i in range(len(APP_COLUMNS))]
    for row in [APP_COLUMNS, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def monitor_json(market: Market, result: MonitorResult) -> dict[str, Any]:
    return {
        "market": market_json(market),
        "used_mb": result.used_mb,
        "free_mb": result.free_mb,
        "total_mb": result.total_mb,
        "apps": [dataclasses.asdict(a) for a in result.apps],
    }


def market_json(market: Market) -> dict[str, Any]:
    return {"id": market.id, "name": market.name, "driver": market.driver}


# ---------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    checker = Checker(market, context(), echo=not args.json)
    if not args.json:
        print(f"marketplace '{printable(market.name)}' (MARKET_MAD={market.driver})", flush=True)
    checker.run()
    failed = sum(1 for c in checker.checks if not c.ok)
    if args.json:
        emit_json(
            {
                "market": market_json(market),
                "ok": checker.ok,
                "checks": [dataclasses.asdict(c) for c in checker.checks],
            }
        )
    else:
        print(f"{len(checker.checks)} checks, {failed} failed")
    return EXIT_OK if checker.ok else EXIT_FAILED


def cmd_apps(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    backend = load_backend(market.driver, market, context())
    with stdout_to_stderr():
        result = backend.monitor()
    if args.json:
        emit_json(monitor_json(market, result))
        return EXIT_OK
    if result.apps:
        print_table([app_row(a) for a in result.apps])
    elif market.driver not in PUBLIC_DRIVERS:
        print(f"no apps listed: the apps of a private '{market.driver}' marketplace live in oned")
    usage = f"USED_MB={result.used_mb} FREE_MB={result.free_mb} TOTAL_MB={result.total_mb}"
    print(f"{len(result.apps)} apps, {usage}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    show = not args.json and not args.quiet and sys.stderr.isatty()
    app, result = push(market, args.file, args.name, args.id, args.format, show)
    if args.json:
        data = dataclasses.asdict(result)
        data.update({"app_id": app.id, "name": app.name})
        emit_json(data)
    else:
        sys.stdout.write(result.to_template())
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    source = args.source.strip()
    if not source:
        raise ConfigError("no SOURCE given")
    app_id = app_id_from_source(source) if args.id is None else args.id
    backend = load_backend(market.driver, market, context())
    with stdout_to_stderr():
        backend.delete_app(App(id=app_id, name="", source=source, type=APP_TYPE_IMAGE))
    if args.json:
        emit_json({"market": market_json(market), "deleted": source})
    else:
        print(f"deleted {printable(source)}")
    return EXIT_OK


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt: no handler of ordinary errors (a check turning a
    MarketError into a failed line) swallows it, and every ``finally`` runs."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM (``timeout``, a service manager) raises :class:`Terminated`
    instead of killing the process, so that ``check``'s probe file in PUBLIC_DIR is removed;
    a second SIGTERM is ignored while that clean-up runs."""

    def handler(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class UsageError(MarketError):
    """A command line argparse refuses."""


class Parser(argparse.ArgumentParser):
    """Usage errors become one line (and JSON with ``--json``) like every other failure,
    instead of argparse's usage block followed by the error."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show DEBUG lines and tracebacks",
    )
    parser = Parser(
        prog="one-market",
        parents=[common],
        description="Check, list, push to and remove from an OpenNebula marketplace. MARKET is "
        "a template file (NAME, MARKET_MAD, driver attributes) or the id or name of a "
        "marketplace of oned (ONE_XMLRPC, ONE_AUTH).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", parents=[common], help="validate the definition and live setup")
    p.add_argument("market", metavar="MARKET")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("apps", parents=[common], help="run the monitor and list the apps")
    p.add_argument("market", metavar="MARKET")
    p.set_defaults(func=cmd_apps)

    p = sub.add_parser("push", parents=[common], help="import a local image file")
    p.add_argument("market", metavar="MARKET")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="app name (default: the file name)")
    p.add_argument("--id", type=int, help="app id (default: current time in milliseconds)")
    p.add_argument("--format", help="image format (default: read from the file header)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("rm", parents=[common], help="remove an app by its SOURCE")
    p.add_argument("market", metavar="MARKET")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--id", type=int, help="app id (default: read from SOURCE, else -1)")
    p.set_defaults(func=cmd_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        words = sys.argv[1:] if argv is None else argv
        fail(str(exc), False, "--json" in words)
        return EXIT_USAGE
    args.json = getattr(args, "json", False)
    args.debug = getattr(args, "debug", False) or driverlog.debug_from_env()
    driverlog.set_debug(args.debug)
    driverlog.route_std_logging()
    try:
        with sigterm_unwinds():
            return args.func(args)
    except Terminated:
        fail(f"{args.command} stopped by SIGTERM", args.debug, args.json)
        return EXIT_TERMINATED
    except MarketError as exc:
        return fail(str(exc), args.debug, args.json)
    except KeyboardInterrupt:
        fail("interrupted", args.debug, args.json)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        return fail(f"internal error: {type(exc).__name__}: {exc}", args.debug, args.json)


def fail(message: str, debug: bool, as_json: bool = False) -> int:
    """The one line on stderr; with ``--json`` also ``{"ok": false, "error": ...}`` on stdout,
    so a script parsing stdout always gets JSON, whatever happened."""
    if debug:
        sys.stderr.write(driverlog.scrub(traceback.format_exc()))
    line = driverlog.scrub(one_line(message))
    sys.stderr.write(f"one-market: {line}\n")
    sys.stderr.flush()
    if as_json:
        with contextlib.suppress(OSError):
            emit_json({"ok": False, "error": line})
            sys.stdout.flush()
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
