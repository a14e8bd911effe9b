"""One progress callback type, throttled, serving the MAD's LOG lines and the CLI's bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from . import driverlog

PROGRESS_INTERVAL_S = 5.0
"""Least time between two progress reports sent to oned's log."""


@dataclass(frozen=True)
class ProgressEvent:
    done_bytes: int
    total_bytes: int | None
    elapsed_s: float
    final: bool = False

    @property
    def rate_bps(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def percent(self) -> float | None:
        if not self.total_bytes:
            return None
        return min(100.0, 100.0 * self.done_bytes / self.total_bytes)

    def describe(self) -> str:
        pct = self.percent
        where = f" ({pct:.0f}%)" if pct is not None else ""
        return f"{human_bytes(self.done_bytes)}{where} at {human_bytes(int(self.rate_bps))}/s"


ProgressCallback = Callable[[ProgressEvent], None]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class Progress:
    """Counts bytes and calls ``callback`` at most every ``interval_s`` seconds (and at the end)."""

    def __init__(
        self,
        total_bytes: int | None,
        callback: ProgressCallback | None,
        interval_s: float | None = None,
    ) -> None:
        self.total_bytes = total_bytes
        self.callback = callback
        if interval_s is None:
            # a callback may ask for more frequent reports (the CLI's terminal bar does)
            interval_s = float(getattr(callback, "interval_s", PROGRESS_INTERVAL_S))
        self.interval_s = interval_s
        self.done_bytes = 0
        self.started = time.monotonic()
        self._last = self.started

    def update(self, n: int) -> None:
        self.done_bytes += n
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.callback(ProgressEvent(self.done_bytes, self.total_bytes, now - self.started))

    def finish(self) -> None:
        if self.callback is not None:
            elapsed = time.monotonic() - self.started
            self.callback(ProgressEvent(self.done_bytes, self.total_bytes, elapsed, final=True))


def log_progress(label: str) -> ProgressCallback:
    """A callback writing ``INFO:`` lines, which the MAD forwards to oned's log."""

    def report(event: ProgressEvent) -> None:
        verb = "done" if event.final else "progress"
        driverlog.info(f"{label} {verb}: {event.describe()}")

    return report
