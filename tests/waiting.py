"""The one bounded wait of the tests: for something a process does, never for a time."""

from __future__ import annotations

import subprocess
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


def signal_when(
    proc: subprocess.Popen[bytes], cond: Callable[[], object], what: str, signum: int
) -> tuple[bytes, bytes]:
    """Once ``cond()`` holds, send ``signum`` to ``proc`` and return its (stdout, stderr);
    fail naming ``what`` if it never holds (the process ended first, or the wait ran out). A
    process still running at the end is killed."""
    try:
        until(lambda: cond() or proc.poll() is not None, what)
        assert cond(), f"{what} never happened (exit status {proc.returncode})"
        proc.send_signal(signum)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
