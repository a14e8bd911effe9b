"""SIGTERM as an exception, so a killed action still removes its temporary files.

The MAD stops an action past its time limit with SIGTERM, then SIGKILL. Python's default for
SIGTERM is to die at once, skipping every ``finally``; inside :func:`sigterm_raises` the signal
raises :class:`ActionTimeout` instead, and a second SIGTERM is ignored so that clean-up runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from ..errors import ActionTimeout


@contextmanager
def sigterm_raises(what: str) -> Iterator[None]:
    """Within the block, SIGTERM raises ``ActionTimeout`` naming ``what`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise ActionTimeout(f"{what} stopped by SIGTERM (action timeout or driver shutdown)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Deadline:
    """An optional time limit checked between chunks (``timeout_s`` None: no limit)."""

    def __init__(self, timeout_s: float | None, what: str) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise ActionTimeout(f"{self.what} ran past its time limit of {self.timeout_s:.0f} s")

    def remaining_s(self, default_s: float) -> float:
        if self.at is None:
            return default_s
        return max(0.1, min(default_s, self.at - time.monotonic()))
