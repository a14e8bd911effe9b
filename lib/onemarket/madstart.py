"""Start-up of the MAD as oned starts it, before the driver library is imported.

oned runs ``execlp(cmd, cmd, ARGUMENTS, NULL)`` with fd 2 closed (OpenNebula
``include/Driver.h``, ``Driver::start_driver``): the whole ARGUMENTS string is *one* argv word,
and any failure before ``INIT SUCCESS`` only shows as ``Driver initialization failed`` in
oned.log. So this module, which needs nothing but the standard library:

- clears the signal mask (oned runs with every signal blocked, and the mask is inherited);
- makes fds 0, 1 and 2 valid (a closed fd 2 would otherwise be taken by the next ``open``, and
  the MAD's log lines would land in a pipe or a file by accident);
- splits the arguments at blanks as the stock wrapper's unquoted ``$*`` does
  (``src/mad/sh/madcommon.sh``, ``execute_mad``), so one word, several words and an empty word
  all work;
- answers oned's ``INIT`` with ``INIT FAILURE <reason>`` when the options are wrong or the
  library cannot be imported, and appends the same reason to ``one_market.log`` whether or not
  ``ONE_MAD_DEBUG`` is set, so that an administrator can find why.

The launcher ``drivers/one_market`` handles what happens before Python runs (a missing
interpreter or package) the same way, in shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

LOG_ENV = "ONE_MARKET_MAD_LOG"
"""Set by the launcher: the MAD's log file (``/var/log/one/one_market.log`` or
``$ONE_LOCATION/var/one_market.log``)."""
INIT_WAIT_BYTES = 64 * 1024
"""Most bytes read while waiting for oned's ``INIT`` line to answer it with a failure."""
EXIT_STARTUP_FAILED = 1


def unblock_signals() -> None:
    """Clear the signal mask oned leaves: it blocks every signal in its threads
    (``src/nebula/Nebula.cc``, ``pthread_sigmask(SIG_BLOCK, ...)`` before the managers start)
    and the mask survives fork and exec, so a MAD that kept it could neither be stopped nor
    stop its actions with SIGTERM (a forked action would ignore ``-w`` for its grace period and
    skip its clean-up). The stock Ruby MAD starts with an empty mask for the same reason."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def ensure_std_fds() -> None:
    """Open /dev/null on whichever of fds 0, 1, 2 is closed (oned closes fd 2)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:  # Python leaves sys.stderr None when fd 2 was closed at start
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115


def split_arguments(argv: Sequence[str]) -> list[str]:
    """Arguments split at blanks like the stock wrapper's ``$*`` (without its globbing)."""
    words: list[str] = []
    for arg in argv:
        words.extend(arg.split())
    return words


def log_path() -> str:
    """Where the MAD's start-up errors go: the launcher says, else OpenNebula's layout."""
    explicit = os.environ.get(LOG_ENV, "")
    if explicit:
        return explicit
    location = os.environ.get("ONE_LOCATION", "").strip()
    if location:
        return os.path.join(location, "var", "one_market.log")
    return "/var/log/one/one_market.log"


def append_log(message: str) -> None:
    """One line at the end of the MAD's log file; silently nothing when it cannot be written."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    line = f"{stamp} one_market: {' '.join(message.split())}\n"
    try:
        fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


def init_failure(reason: str) -> NoReturn:
    """Log ``reason``, wait for oned's ``INIT`` and answer it with ``INIT FAILURE``."""
    reason = " ".join(reason.split()) or "unknown error"
    append_log(f"cannot start: {reason}")
    seen = 0
    while seen < INIT_WAIT_BYTES:  # oned writes INIT right after the exec; EOF ends the wait
        try:
            data = os.read(0, 4096)
        except OSError:
            break
        if not data or b"\n" in data:
            break
        seen += len(data)
    with contextlib.suppress(OSError):
        os.write(1, f"INIT FAILURE {reason}\n".encode("utf-8", "replace"))
    os._exit(EXIT_STARTUP_FAILED)


def main(argv: Sequence[str] | None = None) -> int:
    unblock_signals()
    ensure_std_fds()
    words = split_arguments(sys.argv[1:] if argv is None else argv)
    try:
        from .mad import driver, options
    except Exception as exc:  # noqa: BLE001 - any import failure must reach the admin
        init_failure(f"cannot load the driver library ({type(exc).__name__}: {exc})")
    try:
        parsed = options.parse_args(words)
    except options.UsageError as exc:
        init_failure(f"wrong ARGUMENTS in oned.conf: {exc}")
    return driver.main(parsed)


if __name__ == "__main__":
    sys.exit(main())
