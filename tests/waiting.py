"""The one bounded wait of the tests: for something a process does, never for a time."""

from __future__ import annotations

import time
from collections.abc import Callable

WAIT_S = 20.0
"""Longest wait for what a script, an action or a server does (each signals a state)."""
POLL_S = 0.02


def until(cond: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Return once ``cond()`` is true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)
