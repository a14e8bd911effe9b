"""Stop signals as an exception, so an interrupted import or download still cleans up.

The one place that turns signals into exceptions (the actions, the downloader and one-market use
it). Python's default for SIGTERM and SIGHUP is to die at once, skipping every ``finally``: a
``.part`` file or an open multipart upload would stay behind. Inside :func:`interruptible`:

- SIGTERM (the MAD's time limit or shutdown, ``kill``), SIGINT (Ctrl-C) and SIGHUP (the
  terminal or ssh session went away) raise in the main thread. SIGINT and SIGHUP are left
  alone when they were ignored on entry (``nohup``, a background job of a non-interactive
  shell): ignoring them was asked for.
- Only the first signal raises; later ones are ignored until the outermost block is left, so
  the clean-up cannot be interrupted half-way, except inside :func:`cut_short`: a clean-up's
  wait that the person may end (push waiting up to a minute for oned) lets the next signal
  end that wait, and only it.
- What is raised inside is a BaseException, like KeyboardInterrupt, so that no
  ``except Exception`` on the way (a reader turning any failure into a SourceError) swallows
  it. It leaves the outermost block as :class:`Interrupted`, a :class:`MarketError` carrying
  the signal number and the shell's exit status for it (143 for SIGTERM, 130, 129), so callers
  handle it like any other failure or pick the exit status.
- Blocks nest (a backend inside one-market's block); outside the main thread it does nothing
  (Python delivers signals to the main thread only).

A command wraps its whole run once, and maps the outcome::

    try:
        with interruptible("one-market push"):
            ...
    except Interrupted as exc:     # before MarketError: it is one
        report(str(exc))
        return exc.exit_status     # 143, 130 or 129, as the shell would show it
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from ..errors import ActionTimeout

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that unwind an interruptible block."""
_RESPECT_IGNORED = (signal.SIGINT, signal.SIGHUP)
"""Signals left ignored when ignored on entry (``nohup``, ``&``); SIGTERM always unwinds."""
_REASONS = {
    signal.SIGTERM: "action time limit, driver shutdown or kill",
    signal.SIGINT: "interrupted",
    signal.SIGHUP: "terminal or ssh session closed",
}
SHELL_SIGNAL_BASE = 128
"""A process ended by signal N exits, as the shell reports it, with 128 + N."""


class Interrupted(ActionTimeout):
    """A stop signal ended the work (what leaves the block)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The exit status a shell gives a process killed by this signal (143 for SIGTERM)."""
        return SHELL_SIGNAL_BASE + self.signum


class _Signalled(BaseException):
    """Raised by the handler; becomes :class:`Interrupted` at the outermost block."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.message = message
        self.signum = signum


_depth = 0
"""Interruptible blocks entered in the main thread and not yet left."""
_fired = False
"""A signal already raised in the current outermost block: later ones are ignored."""


@contextmanager
def interruptible(what: str) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT/SIGHUP raise, naming ``what``; :class:`Interrupted`
    leaves the outermost block. Handlers are restored on exit."""
    global _depth, _fired
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        global _fired
        if _fired:
            return
        _fired = True
        name = signal.Signals(signum).name
        raise _Signalled(f"{what} stopped by {name} ({_REASONS[signum]})", signum)

    previous: dict[int, object] = {}
    for sig in STOP_SIGNALS:
        if sig in _RESPECT_IGNORED and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, handler)
    _depth += 1
    try:
        yield
    except _Signalled as exc:
        if _depth == 1:
            raise Interrupted(exc.message, exc.signum) from None
        raise
    finally:
        _depth -= 1
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        if _depth == 0:
            _fired = False


@dataclass
class Cut:
    """Whether a further stop signal ended a :func:`cut_short` block."""

    happened: bool = False


@contextmanager
def cut_short() -> Iterator[Cut]:
    """A wait in a clean-up that a further stop signal ends: inside, after the first signal
    has fired, the next one raises once more and is swallowed at the block's end (``happened``
    tells); outside, later signals stay ignored. Elsewhere (no signal yet, another thread)
    nothing changes."""
    global _fired
    cut = Cut()
    if threading.current_thread() is not threading.main_thread() or not _fired:
        yield cut
        return
    _fired = False
    try:
        yield cut
    except _Signalled:
        cut.happened = True
    finally:
        _fired = True
