"""What a mirror run tells the administrator: progress on stderr, the summary on stdout.

One line per app (``mirrored``, ``unchanged``, ``FAILED``) on stderr; on a terminal, below
those lines, rich progress bars in ``one-market push``'s style (:class:`onemarket.cli.
TransferBar`): one for the whole run (bytes, rate, time left) and one per file being
downloaded, gone when it is done. The summary is text or ``--json``; after it, for a ``one``
mirror, the web-server rule, and the marketplace template to create.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from .. import driverlog
from ..action import Market
from ..errors import one_line
from ..progress import human_bytes
from ..template import write_template
from . import one
from .model import MirrorEntry, MirrorFile, Plan

if TYPE_CHECKING:
    from .s3target import Uploaded

TEMPLATE_SKIPPED_ATTRS = ("ID", "NAME", "MARKET_MAD", "ENDPOINT")
STATUS_MIRRORED = "mirrored"
STATUS_UNCHANGED = "unchanged"
STATUS_FAILED = "failed"
STATUS_KEPT = "kept"
FILE_LABEL_CHARS = 40
"""Widest name of a file's bar: the app's name, and the file's when the app has several."""
OTHER_COLUMNS_CHARS = 60
"""Terminal width the bar and the figures of a row need; the name gets the rest (up to
FILE_LABEL_CHARS), or rich would fold the rows of a narrow terminal onto two lines."""
MIN_LABEL_CHARS = 12


class _Bars(Progress):
    """rich's Progress, redrawn only when told: adding a task (a download thread starting a
    file) would otherwise redraw at once, however many files start a second."""

    def refresh(self) -> None:
        pass


class Reporter:
    """One line per entry on stderr; on a terminal also the progress bars (a
    :class:`~onemarket.mirror.fetch.Watcher`: the download threads report each file's bytes).

    The threads only count (rich's Progress takes its own lock); the screen is redrawn by
    :meth:`draw`, from the main thread, at most every ``interval_s``.
    """

    def __init__(
        self,
        stream: TextIO,
        quiet: bool,
        total_bytes: int,
        total_entries: int,
        out: Console | None = None,
    ) -> None:
        from ..cli import TransferBar, console

        self.stream = stream
        self.quiet = quiet
        if out is None:
            out = console(stderr=True)
            if stream is not sys.stderr:
                out.file = stream
        self.tty = out.is_terminal and not quiet
        self.total_bytes = total_bytes
        self.total_entries = total_entries
        self.done_bytes = 0
        self.done_entries = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._files: dict[str, Any] = {}
        """Path of each file being downloaded -> its bar's task."""
        push_bar = TransferBar("", out)  # its columns: the bars look like push's
        self._bars = _Bars(*push_bar.progress.columns, console=out, auto_refresh=False)
        self._overall = self._bars.add_task(self._overall_label(), total=total_bytes or None)
        self.interval_s = push_bar.interval_s
        self._drawn_at = 0.0
        self._live = False
        """Whether the bars are on screen (from the first :meth:`draw` to :meth:`close`)."""

    def _overall_label(self) -> str:
        return f"mirror {self.done_entries}/{self.total_entries} apps"

    # the Watcher the fetcher reports to (download threads)

    def file_started(self, entry: MirrorEntry, f: MirrorFile) -> None:
        if not self.tty:
            return
        width = self._bars.console.width - OTHER_COLUMNS_CHARS
        width = max(MIN_LABEL_CHARS, min(FILE_LABEL_CHARS, width))
        label = one_line(entry.label, width)
        if len(entry.files) > 1:  # a simplestreams build: which of its files, always shown
            name = one_line(f.path.rsplit("/", 1)[-1], width // 2)
            label = one_line(entry.label, width - len(name) - 1) + " " + name
        task = self._bars.add_task(escape(label), total=f.size)
        with self._lock:
            self._files[f.path] = task

    def file_bytes(self, f: MirrorFile, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            task = self._files.get(f.path)
        if task is not None:
            self._bars.update(task, advance=n)
        if self.tty:
            self._bars.update(self._overall, advance=n)

    def file_ended(self, f: MirrorFile) -> None:
        with self._lock:
            task = self._files.pop(f.path, None)
        if task is not None:
            self._bars.remove_task(task)

    # output (main thread)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        text = driverlog.scrub(text)
        if self.tty:
            self._bars.console.print(Text(text))
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def entry(self, status: str, entry: MirrorEntry, detail: str = "") -> None:
        self.done_entries += 1
        label = one_line(entry.label, 120)
        extra = f" ({human_bytes(entry.size_bytes)})" if status == STATUS_MIRRORED else ""
        self.line(f"{status} {label} {entry.version}{extra}{': ' + detail if detail else ''}")
        if self.tty:
            self._bars.update(self._overall, description=self._overall_label())

    def draw(self) -> None:
        """Redraw the bars (the first call shows them), unless drawn less than
        ``interval_s`` ago."""
        if not self.tty:
            return
        now = time.monotonic()
        if self._live and now - self._drawn_at < self.interval_s:
            return
        self._drawn_at = now
        if self._live:
            self._bars.live.refresh()
        else:
            self._bars.start()  # draws the first time
            self._live = True

    def close(self) -> None:
        """Leave the overall bar's last state on screen (files still in flight are dropped)."""
        with self._lock:
            tasks = list(self._files.values())
            self._files.clear()
        for task in tasks:
            self._bars.remove_task(task)
        if self._live:
            self._bars.stop()
            self._live = False


@dataclass
class Outcome:
    plan: Plan
    dest: Path
    status: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    downloads: int = 0
    requests: int = 0
    pruned: list[str] = field(default_factory=list)
    upload: Uploaded | None = None
    """What ``--to-market <s3 marketplace>`` uploaded; None for a folder."""

    def names(self, status: str) -> list[str]:
        return [e.label for e in self.plan.entries if self.status.get(e.key) == status]

    @property
    def ok(self) -> bool:
        return not any(s in (STATUS_FAILED, STATUS_KEPT) for s in self.status.values())


def dry_run(as_json: bool, rows: list[dict], total: int, dest: Path) -> None:
    """What ``--dry-run`` found: one line per app and the total, or JSON."""
    from ..cli import emit_json, printable

    if as_json:
        emit_json({"ok": True, "dry_run": True, "entries": rows, "fetch_bytes": total})
        return
    for row in rows:
        size = human_bytes(row["fetch_bytes"]) if row["status"] == "fetch" else "-"
        print(f"{row['status']:9}  {size:>10}  {printable(row['name'])}  {row['version']}")
    print(f"{len(rows)} apps, {human_bytes(total)} to fetch into {dest}")


def served_prefix(url: str) -> str:
    path = urlsplit(url).path if url else "/mirror/"
    return "/" + path.strip("/") if path.strip("/") else ""


def web_rules(dest: Path, url: str) -> list[str]:
    """The one web-server rule a ``one`` mirror needs: ``/appliance`` answered from the file."""
    prefix = served_prefix(url)
    catalog = dest.resolve() / one.CATALOG_FILE
    return [
        f"nginx:  location = {prefix}/appliance {{ alias {catalog}; "
        "default_type application/json; }",
        f'Apache: AliasMatch "^{prefix}/appliance/?$" "{catalog}"   (before the Alias of the tree)',
    ]


def market_template(market: Market, outcome: Outcome, url: str, suffix: str) -> str:
    """A marketplace definition for the mirror: the SOURCE's filters, ENDPOINT the mirror."""
    attrs: list[tuple[str, object]] = [
        ("NAME", f"{market.name}{suffix or ' (mirror)'}"),
        ("MARKET_MAD", market.driver),
        ("ENDPOINT", url or "http://<web server>/<path of DEST>/"),
    ]
    attrs += [(k, v) for k, v in market.attrs.items() if k not in TEMPLATE_SKIPPED_ATTRS]
    return write_template(attrs)


def summary(args: argparse.Namespace, market: Market, outcome: Outcome, url: str) -> None:
    from ..cli import emit_json

    plan = outcome.plan
    summary = {
        "ok": outcome.ok,
        "source": plan.source_url,
        "dest": str(outcome.dest),
        "kind": plan.kind,
        "mirrored": outcome.names(STATUS_MIRRORED),
        "unchanged": outcome.names(STATUS_UNCHANGED),
        "failed": [
            {
                "name": e.label,
                "error": outcome.errors[e.key],
                "previous_kept": outcome.status[e.key] == STATUS_KEPT,
            }
            for e in plan.entries
            if e.key in outcome.errors
        ],
        "bytes": outcome.bytes,
        "downloads": outcome.downloads,
        "requests": outcome.requests,
        "catalog_unchanged": plan.from_cache,
        "pruned": len(outcome.pruned),
    }
    if outcome.upload is not None:
        summary["upload"] = outcome.upload.as_dict()
    if args.json:
        emit_json(summary)
        return
    failed = len(summary["failed"])
    print(
        f"{len(summary['mirrored'])} mirrored, {len(summary['unchanged'])} unchanged, "
        f"{failed} failed; {human_bytes(outcome.bytes)} downloaded into {outcome.dest}"
        + (f"; {len(outcome.pruned)} files pruned" if args.prune else "")
    )
    if outcome.upload is not None:
        up = outcome.upload
        print(
            f"uploaded to {up.url}: {up.files} files and {up.catalogs} catalogs "
            f"({human_bytes(up.bytes)}), {up.unchanged} files unchanged"
            + (f", {up.deleted} objects deleted" if args.prune else "")
        )
    elif plan.format is one.FORMAT:
        print("web server rule (GET <ENDPOINT>/appliance must answer appliance.json):")
        for rule in web_rules(outcome.dest, url):
            print(f"  {rule}")
    print("marketplace for the mirror (onemarket create FILE):")
    for line in market_template(market, outcome, url, args.name_suffix).splitlines():
        print(f"  {line}")
