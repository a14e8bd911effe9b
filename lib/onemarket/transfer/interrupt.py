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
  raise :class:`CutShort` there, once.
- Inside :func:`deferred` the first signal is held until the block ends: a call whose answer
  must not be lost (oned's id of an object it has just made) completes, bounded by its own
  time limit, then the signal is raised.
- What is raised inside is a BaseException, like KeyboardInterrupt, so that no
  ``except Exception`` on the way (a reader turning any failure into a SourceError) swallows
  it. It leaves the outermost block as :class:`Interrupted`, a :class:`MarketError` carrying
  the signal number and the shell's exit status for it (143 for SIGTERM, 130, 129), so callers
  handle it like any other failure or pick the exit status.
- Blocks nest (a backend inside one-market's block); outside the main thread it does nothing
  (Python runs handlers in the main thread only).
- Threads are started inside :func:`signals_to_main_thread`, which blocks the stop signals in
  them: the kernel may hand a process's signal to any thread that does not block it, and
  there it only sets Python's flag, so a main thread blocked in a read (a pipe that sends
  nothing more) would never run the handler and the process would not stop.

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


class CutShort(_Signalled):
    """A further stop signal inside :func:`cut_short`: the wait it is in should end."""


_depth = 0
"""Interruptible blocks entered in the main thread and not yet left."""
_fired = False
"""A signal already raised in the current outermost block: later ones are ignored."""
_cuttable = False
"""Inside :func:`cut_short` after the first signal: the next one raises :class:`CutShort`."""
_was_cut = False
"""A :class:`CutShort` was raised in the current outermost block: no wait is cut again."""
_deferring = False
"""Inside :func:`deferred`: the first signal is held in ``_held`` instead of raised."""
_held: _Signalled | None = None


@contextmanager
def interruptible(what: str) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT/SIGHUP raise, naming ``what``; :class:`Interrupted`
    leaves the outermost block. Handlers are restored on exit."""
    global _depth, _fired, _was_cut
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        global _fired, _cuttable, _was_cut, _held
        name = signal.Signals(signum).name
        if _fired:
            if _cuttable:
                _cuttable, _was_cut = False, True
                raise CutShort(f"{what}: {name} again, the wait ended", signum)
            return
        _fired = True
        stop = _Signalled(f"{what} stopped by {name} ({_REASONS[signum]})", signum)
        if _deferring:
            _held = stop
            return
        raise stop

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
            _was_cut = False


@contextmanager
def cut_short() -> Iterator[None]:
    """A clean-up's wait that a further stop signal ends: inside, once the first signal has
    fired, the next one raises :class:`CutShort` (once per outermost block; later blocks are
    inert). Catch it around the ``with`` statement, not inside: the signal may land on the
    block's edges. Elsewhere (no signal yet, another thread) nothing changes."""
    global _cuttable
    if threading.current_thread() is not threading.main_thread() or not _fired or _was_cut:
        yield
        return
    _cuttable = True
    try:
        yield
    finally:
        _cuttable = False


@contextmanager
def deferred() -> Iterator[None]:
    """A call whose answer must not be lost: a first stop signal during the block is held
    and raised when it ends (after the answer is stored), so the wait is the call's own
    time limit. Outside an interruptible block, or in another thread, nothing changes."""
    global _deferring, _held
    main = threading.current_thread() is threading.main_thread()
    if not main or _depth == 0 or _deferring:
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        held, _held = _held, None
        if held is not None:
            raise held


@contextmanager
def signals_to_main_thread() -> Iterator[None]:
    """Start threads inside (``Thread.start``, an executor's ``submit``): they inherit a mask
    that blocks the stop signals, so each signal goes to the main thread and interrupts what
    it waits in. Only the start belongs inside: a signal meanwhile waits until the block
    ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
