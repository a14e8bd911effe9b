"""What a mirror run tells the administrator: progress on stderr, the summary on stdout.

On a terminal an overall line is redrawn in place (bytes, rate, apps in flight); otherwise one
line per app (``mirrored``, ``unchanged``, ``FAILED``). The summary is text or ``--json``;
after it, for a ``one`` mirror, the web-server rule, and the marketplace template to create.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

from .. import driverlog
from ..action import Market
from ..errors import one_line
from ..progress import human_bytes
from ..template import write_template
from . import one
from .model import MirrorEntry, Plan

if TYPE_CHECKING:
    from .s3target import Uploaded

TEMPLATE_SKIPPED_ATTRS = ("ID", "NAME", "MARKET_MAD", "ENDPOINT")
STATUS_MIRRORED = "mirrored"
STATUS_UNCHANGED = "unchanged"
STATUS_FAILED = "failed"
STATUS_KEPT = "kept"


class Reporter:
    """One line per entry on stderr; on a terminal also an overall line redrawn in place."""

    def __init__(self, stream: TextIO, quiet: bool, total_bytes: int, total_entries: int):
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty() and not quiet
        self.total_bytes = total_bytes
        self.total_entries = total_entries
        self.done_bytes = 0
        self.done_entries = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._drawn = False
        self._active: dict[str, int] = {}

    def begin(self, entry: MirrorEntry) -> None:
        with self._lock:
            self._active[entry.label] = self._active.get(entry.label, 0) + 1

    def end(self, entry: MirrorEntry) -> None:
        with self._lock:
            left = self._active.pop(entry.label, 1) - 1
            if left > 0:
                self._active[entry.label] = left

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(driverlog.scrub(text) + "\n")
        self.stream.flush()

    def entry(self, status: str, entry: MirrorEntry, detail: str = "") -> None:
        self.done_entries += 1
        label = one_line(entry.label, 120)
        extra = f" ({human_bytes(entry.size_bytes)})" if status == STATUS_MIRRORED else ""
        self.line(f"{status} {label} {entry.version}{extra}{': ' + detail if detail else ''}")

    def draw(self) -> None:
        if not self.tty:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = max(0, self.done_bytes)
        pct = 100 * done / self.total_bytes if self.total_bytes else 100.0
        text = (
            f"mirror: {self.done_entries}/{self.total_entries} apps, {human_bytes(done)} of "
            f"{human_bytes(self.total_bytes)} ({min(pct, 100):.0f}%) at "
            f"{human_bytes(int(done / elapsed))}/s"
        )
        with self._lock:
            active = ", ".join(one_line(label, 40) for label in self._active)
        if active:
            text += f" - {active}"
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + text[: width - 1].ljust(width - 1))
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            width = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
            self._drawn = False

    def close(self) -> None:
        self._clear()


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
