"""``one-market``: check, list, push to and remove from a marketplace, with the drivers' code.

MARKET is a template file (``NAME``, ``MARKET_MAD`` and the driver attributes, OpenNebula
syntax) or the id or name of a marketplace of the oned found through ``ONE_XMLRPC`` and
``ONE_AUTH``. With a marketplace of oned, ``push`` and ``rm`` work through oned, as an
administrator would with ``oneimage`` and ``onemarketapp`` (an image, then an app made from it,
so oned lists the app); with a template file they are plain uploads and deletions done with the
drivers' code (:func:`onemarket.registry.load_backend`), so what works here works in oned.
Failures are one line on stderr and exit status 1; ``--debug`` adds the traceback and the
drivers' DEBUG lines, never credentials. Exit status 2 is a usage error; a stop signal exits
with the shell's status for it (143 SIGTERM, 130 SIGINT, 129 SIGHUP) after cleaning up.

Terminal output uses rich (progress bars, spinners, tables) only when the stream is a
terminal; otherwise it is plain lines, and ``--json`` output does not depend on either.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import io
import json
import logging
import math
import os
import secrets
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__, driverlog, oneclient
from .action import APP_TYPE_IMAGE, App, ImportInfo, Market
from .backends.base import (
    AppEntry,
    Backend,
    Check,
    Context,
    ImportRequest,
    ImportResult,
    MonitorResult,
)
from .errors import (
    ActionTimeout,
    ConfigError,
    MarketError,
    NotSupportedError,
    RemoteError,
    SourceError,
    StorageError,
    from_os_error,
    one_line,
)
from .installation import Installation
from .location import app_id_from_source
from .markets import PUBLIC_DRIVERS, load_market, missing_attrs
from .mirror.command import add_mirror_parser
from .oneclient import OnedApp, OnedMarket
from .progress import ProgressEvent, human_bytes
from .registry import DRIVERS, backend_class, load_backend
from .template import write_template
from .transfer.interrupt import (
    CutShort,
    Interrupted,
    cut_short,
    deferred,
    interruptible,
    signals_to_main_thread,
)
from .units import mb_bytes, shown
from .units import size_mb as size_mb_of

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HANGUP = 129
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

BAR_INTERVAL_S = 0.2
"""Redraw period of the terminal progress bar."""
SPINNER_REFRESH_PER_S = 4
"""Redraws per second of the spinner lines shown while oned works."""
POLL_FIRST_S = 0.5
POLL_MAX_S = 5.0
"""oned is asked for the state of an image or app first after POLL_FIRST_S, then at doubling
intervals up to POLL_MAX_S (an image copy takes minutes; no need to ask oned ten times a second)."""
ONED_WAIT_LIMIT_S = 24 * 3600.0
"""Default bound on each wait for oned (image copy, app import, app deletion): ``--timeout``."""
SNIFF_BYTES = 512
"""Header bytes read to tell the image format of a pushed file."""
NAME_COLUMN_MAX_CHARS = 60
"""Widest NAME column of the ``apps`` table (longer names are cut; ``--json`` has them whole)."""
NAME_COLUMN_MIN_CHARS = 12
"""Narrowest NAME column on a narrow terminal (the other columns keep their width)."""
CLEANUP_WAIT_S = 60.0
"""After a stop signal, how long ``push`` waits for oned to finish the copy or import it runs
before removing what the push made (within the 90 s a service manager usually allows a stop);
what is still LOCKED then is left and named."""
MAX_EXCEPTION_CHAIN = 8
"""How far back the causes of a failure are searched for notes."""

# ---------------------------------------------------------------------------- output helpers


def printable(text: object) -> str:
    """One line without control characters (catalog text must not drive the terminal)."""
    s = driverlog.scrub(str(text))
    return "".join(ch if ch.isprintable() else " " for ch in s).strip()


def emit_json(data: object) -> None:
    sys.stdout.write(driverlog.scrub(json.dumps(data, indent=2, ensure_ascii=False)) + "\n")


def counted(n: int, noun: str) -> str:
    """``1 check``, ``5 checks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def console(stderr: bool = False) -> Console:
    """A rich console on stdout or stderr: styles and live lines only on a terminal (rich
    decides, honouring NO_COLOR and TERM=dumb); markup and highlighting off, since catalog
    text is data, never formatting."""
    return Console(stderr=stderr, markup=False, highlight=False, emoji=False, soft_wrap=True)


SIGNING_LOGGERS = ("botocore", "boto3", "s3transfer")
"""Libraries whose DEBUG lines are the request signing (canonical request, string to sign,
headers with the signature): hundreds of lines per call, useless to an administrator."""


def quiet_signing_libraries(debug: bool) -> None:
    """``--debug`` keeps our DEBUG lines and urllib3's connection lines, not boto's signing."""
    # (every routed record is masked for signatures by driverlog's handler)
    if debug:
        for name in SIGNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


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


# ---------------------------------------------------------------------------- check


def check_line(check: Check) -> str:
    return f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {printable(check.detail)}"


class Checker:
    """Runs the checks of one market, printing each line as soon as it is known."""

    def __init__(
        self, market: Market, context: Context, echo: bool, out: Console | None = None
    ) -> None:
        self.market = market
        self.context = context
        self.echo = echo
        self.out = out or console()
        self.checks: list[Check] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        check = Check(name, ok, one_line(driverlog.scrub(detail), 400))
        self.checks.append(check)
        if self.echo and self.out.is_terminal:  # the same line, PASS green and FAIL red
            line = Text(check_line(check))
            line.stylize("bold green" if ok else "bold red", 0, 4)
            self.out.print(line)
        elif self.echo:
            print(check_line(check), flush=True)
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
        if isinstance(market, OnedMarket):
            self.check_state(market)
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
        try:
            backend = load_backend(market.driver, market, self.context)
        except MarketError as exc:
            self.add("settings", False, str(exc))
            return
        with contextlib.closing(backend.check()) as checks:
            for check in checks:
                self.add(check.name, check.ok, check.detail)
        self.check_monitor(backend)

    def check_state(self, market: OnedMarket) -> None:
        if market.disabled:
            self.add(
                "state",
                False,
                f"marketplace {market.id} is DISABLED in oned: it is not monitored, so its apps "
                f"and usage are not refreshed (enable it with 'onemarket enable {market.id}')",
            )
        else:
            self.add("state", True, f"marketplace {market.id} is ENABLED in oned")

    def check_monitor(self, backend: Backend) -> None:
        def monitor() -> str:
            with stdout_to_stderr():
                result = backend.monitor()
            usage = f"USED_MB={result.used_mb} FREE_MB={result.free_mb} TOTAL_MB={result.total_mb}"
            if self.market.driver in PUBLIC_DRIVERS:
                if not result.apps:
                    raise ConfigError("the catalog answered but lists no apps")
                return f"catalog answered, {len(result.apps)} apps"
            return usage

        self.attempt("monitor", monitor)


# ---------------------------------------------------------------------------- push


class TransferBar:
    """Progress callback drawing a rich progress bar (bytes, rate, time left) on stderr.

    rich sizes the bar to the terminal, keeps the line when it is resized and leaves a clean
    final line; the hand-drawn bar it replaces did none of this. Redrawn by the callback
    itself (no refresh thread), at most every :data:`BAR_INTERVAL_S`.
    """

    interval_s = BAR_INTERVAL_S

    def __init__(self, label: str, out: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=out or console(stderr=True),
            auto_refresh=False,
        )
        self.label = label
        self.task: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.task is None:
            with signals_to_main_thread():  # rich's refresh thread
                self.progress.start()
            # a file name is text, not markup: '[/x]' in it must not break the bar
            self.task = self.progress.add_task(escape(self.label), total=event.total_bytes)
        self.progress.update(self.task, completed=event.done_bytes, total=event.total_bytes)
        self.progress.refresh()
        if event.final:
            self.close()

    def close(self) -> None:
        """Leave the bar's last state on screen (idempotent; also after a failure)."""
        self.progress.stop()


class Steps:
    """What a push or rm through oned is waiting for, one step at a time, on stderr.

    On a terminal: a spinner line per step with its elapsed time, rewritten as the state
    changes and kept, ticked, when the step is done. Not on a terminal: one plain line per
    change of state. ``quiet``: nothing.
    """

    def __init__(self, quiet: bool, out: Console | None = None) -> None:
        self.out = out or console(stderr=True)
        self.quiet = quiet
        self.live = not quiet and self.out.is_terminal
        self.progress = Progress(
            SpinnerColumn(finished_text="ok"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.out,
            refresh_per_second=SPINNER_REFRESH_PER_S,
        )
        self.task: Any = None
        self.last = ""

    def __enter__(self) -> Steps:
        if self.live:
            with signals_to_main_thread():  # rich's refresh thread
                self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def show(self, text: str) -> None:
        """The current state of the current step (a new step when none is open)."""
        text = printable(text)
        if text == self.last or self.quiet:
            return
        self.last = text
        if not self.live:
            self.out.print(Text(f"one-market: {text}"))
        elif self.task is None:
            self.task = self.progress.add_task(escape(text), total=1)
        else:
            self.progress.update(self.task, description=escape(text))

    def done(self, text: str) -> None:
        """Close the current step with ``text``."""
        self.show(text)
        if self.live and self.task is not None:
            self.progress.update(self.task, completed=1)
        self.task = None


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


@dataclass(frozen=True)
class LocalImage:
    """The file to push, checked once: readable, not a folder; size, MB and format known."""

    path: Path
    size_bytes: int
    size_mb: int
    format: str

    @classmethod
    def open(cls, file: str, fmt: str | None) -> LocalImage:
        path = Path(file)
        try:
            st = path.stat()
        except OSError as exc:
            raise SourceError(f"cannot read {file}: {exc.strerror or exc}") from None
        if path.is_dir():
            raise SourceError(f"{file} is a directory, not an image file")
        if not os.access(path, os.R_OK):
            raise SourceError(f"cannot read {file}: permission denied")
        size_mb = size_mb_of(st.st_size)
        return cls(path.resolve(), st.st_size, size_mb, fmt or sniff_format(path))


def push(
    market: Market, file: str, name: str | None, app_id: int | None, fmt: str | None, progress: bool
) -> tuple[App, ImportResult]:
    """Import a local file (or block device, or pipe) through the market's backend."""
    image = LocalImage.open(file, fmt)
    app = App(
        id=default_app_id() if app_id is None else app_id,
        name=name or image.path.name,
        size_mb=image.size_mb,
        format=image.format,
        type=APP_TYPE_IMAGE,
    )
    info = ImportInfo(source=str(image.path), size_mb=image.size_mb, format=image.format)
    bar = TransferBar(f"push {printable(app.name)}") if progress else None
    backend = load_backend(market.driver, market, context(bar))
    try:
        with stdout_to_stderr():
            result = backend.import_app(ImportRequest(app=app, source=info))
    finally:
        if bar is not None:
            bar.close()
    return app, result


T = TypeVar("T")


def wait_for(
    read: Callable[[], T | None],
    finished: Callable[[T | None], bool],
    describe: Callable[[T | None], str],
    steps: Steps,
    limit_s: float,
    what: str,
) -> T | None:
    """Ask oned with ``read`` until ``finished``, showing each state; bounded by ``limit_s``."""
    delay = POLL_FIRST_S
    deadline = time.monotonic() + limit_s
    for _ in range(math.ceil(limit_s / POLL_FIRST_S) + 1):  # bounded even if the clock stalls
        obj = read()
        steps.show(describe(obj))
        if finished(obj):
            return obj
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
    raise ActionTimeout(f"{what}: oned was not done after {limit_s:.0f} s ({describe(read())})")


@dataclass
class OnedPush:
    """``push`` to a marketplace of oned, as an administrator does it by hand: an image made
    from FILE in an image datastore (``oneimage create``), then an app made from that image
    (``onemarketapp create --image``), which oned imports through the market driver; then,
    when asked, the image removed. A failure or a stop signal removes what this push made
    (:meth:`_clean_up`) and says what is left."""

    server: Any
    market: OnedMarket
    steps: Steps
    limit_s: float
    image_id: int = -1
    app_id: int = -1

    def run(
        self, local: LocalImage, name: str, datastore_ref: str, delete_image: bool
    ) -> tuple[OnedApp, bool]:
        ds = oneclient.find_datastore(self.server, datastore_ref)
        size = human_bytes(local.size_bytes)
        template = [
            ("NAME", f"{name} (one-market {secrets.token_hex(3)})"),
            ("PATH", str(local.path)),
            ("TYPE", "OS"),
            ("DESCRIPTION", f"uploaded by one-market for marketplace app '{name}'"),
        ]
        self.steps.show(f"image: asking oned to copy {local.path.name} ({size}) into '{ds.name}'")
        try:
            with deferred():  # a signal waits for oned's answer: its id is what we remove
                self.image_id = self._allocate_image(write_template(template), ds, local)
            return self._image_to_app(local, name, ds, delete_image)
        except BaseException as exc:  # a failure, or a stop signal (transfer/interrupt)
            stopped = not isinstance(exc, Exception)
            exc.add_note(self._clean_up(CLEANUP_WAIT_S if stopped else 0.0))
            raise

    def _allocate_image(self, template: str, ds: oneclient.OnedDatastore, local: LocalImage) -> int:
        try:
            return oneclient.allocate_image(self.server, template, ds.id)
        except RemoteError as exc:  # the usual cause: FILE is not on oned's host
            raise RemoteError(
                f"{exc} (oned's datastore driver reads {local.path} on oned's host, as oneadmin)"
            ) from None

    def _image_to_app(
        self, local: LocalImage, name: str, ds: oneclient.OnedDatastore, delete_image: bool
    ) -> tuple[OnedApp, bool]:
        what = f"image {self.image_id} (datastore {ds.id} '{ds.name}')"
        image = wait_for(
            lambda: oneclient.image_info(self.server, self.image_id),
            lambda i: (
                i is None or i.state in (oneclient.IMAGE_STATE_READY, oneclient.IMAGE_STATE_ERROR)
            ),
            lambda i: f"{what}: " + ("gone" if i is None else f"{i.state_name}, {i.size_mb} MB"),
            self.steps,
            self.limit_s,
            what,
        )
        if image is None:
            raise RemoteError(f"{what} vanished from oned while it copied {local.path}")
        if image.state == oneclient.IMAGE_STATE_ERROR:
            raise StorageError(
                f"oned could not copy {local.path} into {what}: {image.error or 'ERROR'}"
            )
        self.steps.done(f"image {self.image_id}: READY, {image.size_mb} MB")

        app_template = [("NAME", name), ("ORIGIN_ID", str(self.image_id)), ("TYPE", "IMAGE")]
        market = f"marketplace {self.market.id} '{self.market.name}'"
        self.steps.show(f"app '{name}': asking oned to make it in {market}")
        with deferred():
            self.app_id = oneclient.allocate_app(
                self.server, write_template(app_template), self.market.id
            )
        what = f"app {self.app_id} '{name}'"
        app = wait_for(
            lambda: oneclient.app_info(self.server, self.app_id),
            lambda a: (
                a is None or a.state in (oneclient.APP_STATE_READY, oneclient.APP_STATE_ERROR)
            ),
            lambda a: f"{what}: " + ("gone" if a is None else a.state_name),
            self.steps,
            self.limit_s,
            what,
        )
        if app is None:
            raise RemoteError(f"{what} vanished from oned during its import")
        if app.state == oneclient.APP_STATE_ERROR:
            raise RemoteError(f"oned could not make {what} in {market}: {app.error or 'ERROR'}")
        self.steps.done(f"{what}: READY, {app.size_mb} MB, MD5 {app.md5}")
        deleted = False
        if delete_image:
            deleted = self._delete_image_after(app)
        return app, deleted

    def _delete_image_after(self, app: OnedApp) -> bool:
        try:
            oneclient.delete_image(self.server, self.image_id)
        except MarketError as exc:
            driverlog.warn(f"app {app.id} is READY, but image {self.image_id} stays: {exc}")
            return False
        self.steps.done(f"image {self.image_id}: deleted (--delete-image)")
        return True

    def _clean_up(self, wait_s: float) -> str:
        """Remove the app and image this push made (best effort); say what is left.

        oned cannot stop a copy or an import it runs, and removing the object meanwhile leaves
        the file being written behind, listed nowhere (oned only logs it). So an object still
        LOCKED is waited for, up to ``wait_s`` in all (after a stop signal; not after a
        failure), then left and named with the command that removes it. A second stop signal
        ends the wait at once (transfer/interrupt.cut_short): what is still busy is left.
        """
        deadline = time.monotonic() + min(wait_s, self.limit_s)
        removed: list[str] = []
        left: list[str] = []
        made = [  # the app first: while it imports, oned keeps its image LOCKED
            (
                "app",
                self.app_id,
                "onemarketapp",
                oneclient.app_info,
                oneclient.APP_STATE_LOCKED,
                oneclient.delete_app,
            ),
            (
                "image",
                self.image_id,
                "oneimage",
                oneclient.image_info,
                oneclient.IMAGE_STATE_LOCKED,
                oneclient.delete_image,
            ),
        ]
        cut = False
        for kind, obj_id, command, read, busy, delete in made:
            if obj_id < 0:
                continue
            what = f"{kind} {obj_id}"
            outcome = self._remove(
                what,
                partial(read, self.server, obj_id),
                busy,
                partial(delete, self.server, obj_id),
                time.monotonic() if cut else deadline,
                cuttable=wait_s > 0 and not cut,
            )
            cut = cut or outcome is _Removal.CUT
            if outcome is _Removal.GONE:
                removed.append(what)
            else:
                left.append(f"{what} ({command} delete {obj_id})")
        if not left:
            return f"removed {' and '.join(removed)} it made in oned" if removed else ""
        told = "oned goes on with " + " and ".join(left) + ": remove what you do not want"
        return told + (f" (removed {' and '.join(removed)})" if removed else "")

    def _remove(
        self,
        what: str,
        read: Callable[[], Any],
        busy: int,
        delete: Callable[[], None],
        deadline: float,
        cuttable: bool,
    ) -> _Removal:
        """Delete one object once oned no longer works on it (state ``busy``), by ``deadline``;
        a further stop signal ends that wait (transfer/interrupt.cut_short), not the delete."""
        try:
            with cut_short():
                obj = wait_for(
                    read,
                    lambda o: o is None or o.state != busy,
                    partial(_removal_state, what, busy, cuttable),
                    self.steps,
                    max(deadline - time.monotonic(), 0.0),
                    what,
                )
        except CutShort:
            return _Removal.CUT
        except MarketError:
            return _Removal.LEFT
        try:
            if obj is not None:
                delete()
        except MarketError:
            return _Removal.LEFT
        return _Removal.GONE


class _Removal(enum.Enum):
    """What push's clean-up did with one object it made."""

    GONE = "removed (or oned had dropped it)"
    LEFT = "still busy at the deadline, or oned refused"
    CUT = "left: a further stop signal ended the wait"


def _removal_state(what: str, busy: int, cuttable: bool, obj: Any) -> str:
    """One step line of push's clean-up; while it waits after a stop signal, it says that a
    second one ends the wait."""
    if obj is None:
        return f"{what}: gone"
    if obj.state != busy:
        return f"{what}: {obj.state_name}, to remove"
    return f"{what}: {obj.state_name}, waiting for oned" + (
        " (Ctrl-C again leaves it)" if cuttable else ""
    )


# ---------------------------------------------------------------------------- apps

APP_COLUMNS = ("NAME", "VERSION", "TYPE", "ARCH", "HYPERVISOR", "SIZE", "FORMAT")


def app_row(app: AppEntry) -> tuple[str, ...]:
    size = "-" if app.size_mb is None else human_bytes(mb_bytes(app.size_mb))
    name = printable(app.name)
    if len(name) > NAME_COLUMN_MAX_CHARS:
        name = name[: NAME_COLUMN_MAX_CHARS - 3] + "..."
    fields = (name, app.version, app.type, app.architecture, app.hypervisor, size, app.format)
    return tuple(printable(f) or "-" for f in fields)


def print_table(rows: list[tuple[str, ...]], out: Console | None = None) -> None:
    """The apps as a table: rich's on a terminal (fitted to its width, long cells cut with an
    ellipsis instead of wrapping the whole row), plain aligned columns for pipes and files."""
    out = out or console()
    if out.is_terminal:
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(APP_COLUMNS)]
        gaps = 2 * (len(APP_COLUMNS) - 1)
        room = max(NAME_COLUMN_MIN_CHARS, out.width - sum(widths[1:]) - gaps)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for i, column in enumerate(APP_COLUMNS):  # the name gives way, the short fields keep
            table.add_column(
                column,
                overflow="ellipsis",
                no_wrap=True,
                max_width=room if i == 0 else None,
                min_width=None if i == 0 else widths[i],
            )
        for row in rows:
            table.add_row(*(Text(c) for c in row))
        out.print(table)
        return
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


# ---------------------------------------------------------------------------- rm


class _MissingSource(StorageError):
    """The SOURCE named on the command line does not exist in the marketplace."""


def delete_file(market: Market, source: str, app_id: int) -> None:
    """Delete SOURCE with the market's backend; a SOURCE that is not there is an error.

    The backend's lines are held until it answers: when it deleted nothing (oned's DELETE of a
    missing file succeeds, so the backend only warns), what it said (where it looked) becomes
    the detail of the one error line instead of a second line.
    """
    backend = load_backend(market.driver, market, context())
    held = io.StringIO()
    deleted: bool | None = None
    saved, driverlog.stream = driverlog.stream, held
    try:
        with stdout_to_stderr():
            app = App(id=app_id, name="", source=source, type=APP_TYPE_IMAGE)
            deleted = backend.delete_app(app)
    finally:
        driverlog.stream = saved
        if deleted is not False:  # deleted, or failed: its lines go out as they are
            sys.stderr.write(held.getvalue())
    if deleted:
        return
    said = "; ".join(line.partition(": ")[2] for line in held.getvalue().splitlines())
    detail = f" ({said})" if said else ""
    raise _MissingSource(f"{source} does not exist, nothing deleted{detail}")


def oned_apps_of(source: str, market: Market, force: bool) -> tuple[Any, list[OnedApp]]:
    """oned's client and the apps it lists with SOURCE ``source``.

    With a template file and no oned configured: no apps. An oned that is configured but cannot
    be asked is a failure unless ``force``: deleting a file oned still serves is what rm must
    not do blindly.
    """
    server = oneclient.connect()
    if server is None:
        if isinstance(market, OnedMarket):
            raise ConfigError("oned is not configured (ONE_AUTH)")
        return None, []
    try:
        return server, oneclient.apps_with_source(server, source)
    except MarketError as exc:
        if force and not isinstance(market, OnedMarket):
            driverlog.warn(f"not checked with oned whether an app uses {source} (--force): {exc}")
            return None, []
        raise type(exc)(
            f"{exc}; cannot check that no app of oned uses {source} (--force deletes anyway)"
        ) from None


def delete_through_oned(server: Any, app: OnedApp, steps: Steps, limit_s: float) -> None:
    """``onemarketapp delete``: oned has the market driver delete SOURCE, then drops the app."""
    what = f"app {app.id} '{app.name}' of marketplace {app.market_id}"
    steps.show(f"{what}: asking oned to delete it")
    oneclient.delete_app(server, app.id)
    wait_for(
        lambda: oneclient.app_info(server, app.id),
        lambda a: a is None,
        lambda a: f"{what}: " + ("deleted" if a is None else f"{a.state_name}, deleting"),
        steps,
        limit_s,
        what,
    )
    steps.done(f"{what}: deleted")


def rm(args: argparse.Namespace, market: Market, source: str) -> dict[str, Any]:
    """Remove SOURCE: through oned when one of its apps is SOURCE, otherwise the file itself."""
    server, apps = oned_apps_of(source, market, args.force)
    if isinstance(market, OnedMarket):
        mine = [a for a in apps if a.market_id == market.id]
        if mine:
            app = mine[0]
            with Steps(args.quiet or args.json) as steps:
                delete_through_oned(server, app, steps, args.timeout)
            return {"deleted": source, "app_id": app.id, "through": "oned"}
    if apps and not args.force:
        app = apps[0]
        raise ConfigError(
            f"{source} is the SOURCE of app {app.id} '{app.name}' of marketplace "
            f"{app.market_id} '{app.market}' in oned: remove the app with 'one-market rm "
            f"{app.market_id} SOURCE' or 'onemarketapp delete {app.id}' "
            "(--force deletes the file and leaves the app broken)"
        )
    app_id = app_id_from_source(source) if args.id is None else args.id
    delete_file(market, source, app_id)
    return {"deleted": source}


# ---------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    checker = Checker(market, context(), echo=not args.json)
    if not args.json:
        driver = printable(market.driver)
        print(f"marketplace '{printable(market.name)}' (MARKET_MAD={driver})", flush=True)
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
        print(f"{counted(len(checker.checks), 'check')}, {failed} failed")
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
        driver = printable(market.driver)
        print(f"no apps listed: the apps of a private '{driver}' marketplace live in oned")
    usage = f"USED_MB={result.used_mb} FREE_MB={result.free_mb} TOTAL_MB={result.total_mb}"
    print(f"{counted(len(result.apps), 'app')}, {usage}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    if isinstance(market, OnedMarket):
        return push_through_oned(args, market)
    if args.datastore is not None or args.delete_image:
        raise ConfigError(
            "--datastore and --delete-image need MARKET to be a marketplace of oned (id or "
            "name), not a template file"
        )
    show = not args.json and not args.quiet and sys.stderr.isatty()
    app, result = push(market, args.file, args.name, args.id, args.format, show)
    if not args.json:
        print(
            f"one-market: plain upload ({args.market} is a template file): no app of oned lists "
            "it and only 'one-market rm' removes it; give a marketplace id or name to make an app",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        data = dataclasses.asdict(result)
        data.update({"app_id": app.id, "name": app.name})
        emit_json(data)
    else:
        sys.stdout.write(result.to_template())
    return EXIT_OK


def push_through_oned(args: argparse.Namespace, market: OnedMarket) -> int:
    if market.driver in PUBLIC_DRIVERS:
        raise NotSupportedError(
            f"marketplace {market.id} '{market.name}' is a public catalog ({market.driver}): "
            "apps cannot be pushed to it"
        )
    if args.id is not None:
        raise ConfigError("--id is for template files: oned numbers the apps it makes")
    if args.format:
        raise ConfigError(
            "--format is for template files: oned's datastore driver reads the format of FILE"
        )
    if not args.datastore:
        raise ConfigError(
            f"pushing to marketplace {market.id} through oned needs --datastore: the image "
            "datastore (id or name) oned copies FILE into before making the app from it"
        )
    local = LocalImage.open(args.file, args.format)
    name = args.name or local.path.name
    server = oneclient.connect()
    if server is None:
        raise ConfigError("oned is not configured (ONE_AUTH)")
    with Steps(args.quiet or args.json) as steps:
        job = OnedPush(server, market, steps, args.timeout)
        app, image_deleted = job.run(local, name, args.datastore, args.delete_image)
    if args.json:
        emit_json(
            {
                "source": app.source,
                "md5": app.md5,
                "size_mb": app.size_mb,
                "format": app.format,
                "app_id": app.id,
                "name": app.name,
                "market": market_json(market),
                "image_id": job.image_id,
                "image_deleted": image_deleted,
            }
        )
    else:
        pairs = [("ID", str(app.id)), ("NAME", app.name), ("SOURCE", app.source)]
        pairs += [("MD5", app.md5), ("SIZE", str(app.size_mb)), ("FORMAT", app.format or "raw")]
        sys.stdout.write(write_template(pairs))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    market = load_market(args.market)
    source = args.source.strip()
    if not source:
        raise ConfigError("no SOURCE given")
    if market.driver in PUBLIC_DRIVERS:
        raise NotSupportedError(
            f"marketplace '{market.name}' is a public catalog ({market.driver}): "
            "nothing can be removed from it"
        )
    done = rm(args, market, source)
    if args.json:
        emit_json({"market": market_json(market), **done})
    elif "app_id" in done:
        print(f"deleted app {done['app_id']} through oned: {printable(source)}")
    else:
        print(f"deleted {printable(source)}")
    return EXIT_OK


STOPPED_BY = {
    signal.SIGTERM: "stopped by SIGTERM (sent by kill, timeout, a service manager or a shutdown)",
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGHUP: "stopped by SIGHUP (its terminal or ssh session closed)",
}
"""What a stop signal means to someone at a terminal (the drivers' words are about oned)."""


def stopped_message(command: str, exc: Interrupted) -> str:
    said = STOPPED_BY.get(signal.Signals(exc.signum), f"stopped by signal {exc.signum}")
    return f"{command} {said}"


class UsageError(MarketError):
    """A command line argparse refuses."""


class Parser(argparse.ArgumentParser):
    """Usage errors become one line (and JSON with ``--json``) like every other failure,
    instead of argparse's usage block followed by the error."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show DEBUG lines and tracebacks (never credentials)",
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

    wait = Parser(add_help=False)
    wait.add_argument(
        "--timeout",
        type=positive_seconds,
        default=ONED_WAIT_LIMIT_S,
        metavar="SECONDS",
        help=f"longest wait for each step oned runs (default {ONED_WAIT_LIMIT_S:.0f})",
    )
    wait.add_argument("--quiet", action="store_true", help="no progress bar or step lines")

    p = sub.add_parser(
        "push",
        parents=[common, wait],
        help="make an app from a local image file (through oned when MARKET is one of its "
        "marketplaces; a plain upload with a template file)",
    )
    p.add_argument("market", metavar="MARKET")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="app name (default: the file name)")
    p.add_argument(
        "--datastore",
        metavar="DATASTORE",
        help="oned: image datastore (id or name) that FILE is first copied into, as an image",
    )
    p.add_argument(
        "--delete-image",
        action="store_true",
        help="oned: delete that image once the app is READY",
    )
    p.add_argument(
        "--id", type=int, help="template file: app id (default: current time in milliseconds)"
    )
    p.add_argument("--format", help="image format (default: read from the file header)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "rm",
        parents=[common, wait],
        help="remove an app by its SOURCE (through oned when oned lists it)",
    )
    p.add_argument("market", metavar="MARKET")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--id", type=int, help="app id (default: read from SOURCE, else -1)")
    p.add_argument(
        "--force",
        action="store_true",
        help="template file: delete the file even if an app of oned uses it",
    )
    p.set_defaults(func=cmd_rm)

    add_mirror_parser(sub, common, installation)
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
    quiet_signing_libraries(args.debug)
    try:
        with interruptible(f"one-market {args.command}"):
            return args.func(args)
    except Interrupted as exc:
        fail(with_notes(stopped_message(args.command, exc), exc), args.debug, args.json)
        return exc.exit_status
    except MarketError as exc:
        return fail(with_notes(str(exc), exc), args.debug, args.json)
    except KeyboardInterrupt:  # SIGINT ignored on entry, then raised by Python itself
        fail(f"{args.command} interrupted (Ctrl-C)", args.debug, args.json)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        return fail(f"internal error: {type(exc).__name__}: {exc}", args.debug, args.json)


def with_notes(message: str, exc: BaseException) -> str:
    """The message and what the command added on the way out (e.g. what is left in oned),
    also when the exception was replaced on the way (a signal becomes :class:`Interrupted`)."""
    notes: list[str] = []
    seen: BaseException | None = exc
    for _ in range(MAX_EXCEPTION_CHAIN):
        if seen is None:
            break
        notes += [n for n in getattr(seen, "__notes__", []) if n and n not in notes]
        seen = seen.__cause__ or seen.__context__
    return "; ".join([message, *notes])


def fail(message: str, debug: bool, as_json: bool = False) -> int:
    """The one line on stderr; with ``--json`` also ``{"ok": false, "error": ...}`` on stdout,
    so a script parsing stdout always gets JSON, whatever happened."""
    if debug:
        sys.stderr.write(driverlog.mask_credentials(driverlog.scrub(traceback.format_exc())))
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
