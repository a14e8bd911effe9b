"""The ``one_market`` MAD: the process oned talks to for every marketplace action.

One single-threaded asyncio loop reads oned's requests on stdin and writes the replies and
``LOG`` lines on stdout, one whole line per write, so concurrent actions never interleave.
Each action runs in its own process group, so a timeout or ``DRIVER_CANCEL`` kills it with all
its children. Our own actions (``remotes/market/<driver>/<action>`` scripts that call
``onemarket.runner``) run in a forked child of this process, which imported the library once:
the cost of an action is a fork, not an interpreter start. Any other executable in a driver
folder, and the datastore ``export``, is executed the way the stock MAD does it.

The stderr of an action is read while it runs: ``INFO:``/``WARN:``/``ERROR:``/``DEBUG:`` lines
become ``LOG`` messages at once, the other lines become the failure text. Action data is never
written to any log: it may carry credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import errno
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import protocol, runner
from .action import APP_TYPE_IMAGE, ActionData, ImportInfo, decode_action
from .errors import MarketError, one_line
from .installation import Installation
from .registry import DRIVERS, backend_class
from .template import parse_template

DEFAULT_CONCURRENCY = 15
"""Actions run at once (``-t``); each is a process, so this bounds processes and memory."""
KILL_GRACE_S = 10.0
"""Time a timed-out or cancelled action gets between SIGTERM and SIGKILL: enough for an import
to remove its temporary file or abort its multipart upload (a few requests)."""
STOP_GRACE_S = 5.0
"""The same grace when oned stops the MAD (FINALIZE or EOF): oned SIGKILLs the MAD 10 s after
FINALIZE (``Driver::stop_driver``, MarketPlaceManager ``drivers_timeout``), so running actions
are SIGTERMed at once and SIGKILLed after this, and the MAD exits well before oned's kill."""
STOP_DEADLINE_S = 8.0
"""Longest time from FINALIZE or EOF to the MAD's exit, whatever its children do."""
MAX_EXPORT_OUTPUT_BYTES = 1024 * 1024
"""Largest stdout accepted from a datastore export: its ``<IMPORT_INFO>`` is a few hundred
bytes, and it is parsed in the MAD's loop, so a runaway export cannot stall other requests."""
MAX_LINE_BYTES = 48 * 1024 * 1024
"""Longest request line buffered from oned (the largest action data, base64); held in memory."""
LINE_PREFIX_BYTES = 256
"""Start of an over-long request line kept to answer it (action and id)."""
MAX_RESULT_BYTES = 64 * 1024 * 1024
"""Largest stdout accepted from one action; it is held in memory until the reply is sent."""
MAX_STDERR_LINE_BYTES = 64 * 1024
"""Longest stderr line buffered from an action; the rest of a longer line is dropped."""
MAX_ERROR_LINES = 100
"""Plain stderr lines kept for the failure text, the last ones (the cause usually comes last);
the text is then cut to protocol.MAX_FAILURE_CHARS."""
ERROR_BLOCK_START = "ERROR MESSAGE --8<------"
ERROR_BLOCK_END = "ERROR MESSAGE ------>8--"
"""Markers of the error block that upstream scripts write (scripts_common.sh error_message):
when present, only the text between them is the failure, as in the stock MAD."""
READ_CHUNK_BYTES = 64 * 1024
"""Bytes read from a pipe at a time (one pipe buffer)."""
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024
"""Bytes still read from an action's pipes once it has exited (a grandchild may write forever)."""
REAP_POLL_S = 0.05
"""Poll interval for exited children, only where pidfd_open is not available."""
OURS_PROBE_BYTES = 4096
"""Bytes of an action executable read to recognise one of ours."""
OURS_MARKER = b"onemarket.runner"

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
_LONG_BASE64_RE = re.compile(r"[A-Za-z0-9+/=]{120,}")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SCRUB_WINDOW_CHARS = 64
"""Characters of a long base64 run compared with the payloads to tell a cut-out piece of one."""
PR_SET_PDEATHSIG = 1
"""prctl(2) option: a signal the kernel sends a child when its parent dies."""


def error_block(lines: list[str]) -> list[str]:
    """The lines inside upstream's ``ERROR MESSAGE --8<--`` block when there is one, else all."""
    try:
        start = lines.index(ERROR_BLOCK_START)
    except ValueError:
        return lines
    end = lines.index(ERROR_BLOCK_END, start) if ERROR_BLOCK_END in lines[start:] else len(lines)
    return lines[start + 1 : end] or lines


# --------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class Options:
    concurrency: int = DEFAULT_CONCURRENCY
    drivers: tuple[str, ...] | None = None
    timeout_s: float | None = None
    proxy: str | None = None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be 0 (no timeout) or more: {text}")
    return value


class UsageError(ValueError):
    """Options the MAD cannot start with; the message says which and why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: Sequence[str]) -> Options:
    """Options of the stock MAD (``-t``, ``-m``, ``-w``, ``-p``), already split into words;
    anything else raises UsageError (the start-up answers it with ``INIT FAILURE``)."""
    parser = _Parser(
        prog="one_market",
        description="OpenNebula marketplace driver (MAD): reads oned's requests on stdin.",
    )
    parser.add_argument(
        "-t", "--threads", type=_positive_int, default=DEFAULT_CONCURRENCY,
        help=f"actions run at once (default {DEFAULT_CONCURRENCY}); more requests wait",
    )  # fmt: skip
    parser.add_argument(
        "-m", "--market-types", default=None,
        help="enabled drivers, comma separated (default: every folder of remotes/market)",
    )  # fmt: skip
    parser.add_argument(
        "-w", "--timeout", type=_seconds, default=0.0,
        help="seconds each executed action may run (0: no limit)",
    )  # fmt: skip
    parser.add_argument("-p", "--proxy", default=None, help="http(s) proxy for the actions")
    ns = parser.parse_args(list(argv))
    drivers = None
    if ns.market_types is not None:
        drivers = tuple(d.strip() for d in ns.market_types.split(",") if d.strip())
    return Options(
        concurrency=ns.threads,
        drivers=drivers,
        timeout_s=ns.timeout or None,
        proxy=ns.proxy or None,
    )


# --------------------------------------------------------------------------------------------
# children


@dataclass
class Outcome:
    """How an executed action ended."""

    status: int
    """Exit code, or minus the signal number that killed it."""
    stdout: bytes = b""
    errors: list[str] = field(default_factory=list)
    killed: str = ""
    """Why the MAD killed it (timeout, cancel), empty otherwise."""

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.killed

    def failure_text(self, label: str) -> str:
        if self.killed:
            return self.killed
        if self.errors:
            text = "; ".join(error_block(self.errors))
            limit = protocol.MAX_FAILURE_CHARS
            return text if len(text) <= limit else "..." + text[-(limit - 3) :]
        if self.status < 0:
            try:
                name = signal.Signals(-self.status).name
            except ValueError:
                name = str(-self.status)
            return f"{label} was killed by signal {name}"
        return f"{label} failed with exit code {self.status} and no error message"


class Scrubber:
    """Removes action data (base64, which hides nothing) from lines an action wrote.

    Only what is secret is removed: a whole payload, and any long base64 run cut out of one
    (a script that logs part of its argument). Other long runs of base64-looking characters
    (a long SOURCE, bucket or key name) stay, so a failure keeps its cause.
    """

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        self._secrets = [
            s.decode("ascii", "replace") if isinstance(s, bytes) else s
            for s in secrets
            if s and len(s) >= 16
        ]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<action data>")
        return _LONG_BASE64_RE.sub(self._fragment, text)

    def _fragment(self, match: re.Match[str]) -> str:
        run = match.group()
        # a window from the middle: letters glued to either end ("arg" + payload) do not count
        start = len(run) // 4
        window = run[start : start + SCRUB_WINDOW_CHARS]
        if any(window in secret for secret in self._secrets):
            return "<base64 data>"
        return run


LogCallback = Callable[[str, str], None]


class Child:
    """A running action: its pipes are read as it writes them; ``done`` gives its Outcome."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        out_fd: int,
        err_fd: int,
        on_log: LogCallback,
        scrub: Callable[[str], str],
        stdin_fd: int | None = None,
        stdin_data: bytes = b"",
        max_stdout: int = MAX_RESULT_BYTES,
    ) -> None:
        self.pid = pid
        self._max_out = max_stdout
        self.done: asyncio.Future[Outcome] = loop.create_future()
        self._loop = loop
        self._out_fd: int | None = out_fd
        self._err_fd: int | None = err_fd
        self._in_fd = stdin_fd
        self._in_data = memoryview(stdin_data)
        self._on_log = on_log
        self._scrub = scrub
        self._stdout = bytearray()
        self._errors: list[str] = []
        self._err_buf = bytearray()
        self._err_skipping = False
        self._killed = ""
        self._timers: list[asyncio.TimerHandle] = []
        self._pidfd: int | None = None
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
        loop.add_reader(out_fd, self._read_out)
        loop.add_reader(err_fd, self._read_err)
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)
            loop.add_writer(stdin_fd, self._write_in)
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._timers.append(loop.call_later(REAP_POLL_S, self._poll_reap))
        else:
            loop.add_reader(self._pidfd, self._reap)

    # -- control
    def set_timeout(self, seconds: float, reason: str) -> None:
        self._timers.append(self._loop.call_later(seconds, self.kill, reason))

    def kill(self, reason: str, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM the whole process group now, SIGKILL it after ``grace_s``."""
        if self.done.done() or self._killed:
            return
        self._killed = reason
        self._signal(signal.SIGTERM)
        self._timers.append(self._loop.call_later(grace_s, self._signal, signal.SIGKILL))

    def _signal(self, sig: int, leader_alive: bool = True) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # a forked child may not have called setsid() yet: signal it alone (only while it
            # is not reaped, so that a recycled pid is never hit)
            if leader_alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
        except PermissionError:
            pass

    # -- pipes
    def _read_out(self) -> int:
        return self._pump(self._out_fd, self._take_out, self._close_out)

    def _read_err(self) -> int:
        return self._pump(self._err_fd, self._feed_err, self._close_err)

    @staticmethod
    def _pump(fd: int | None, consume: Callable[[bytes], None], close: Callable[[], None]) -> int:
        """Read one chunk and hand it over; the bytes read (0: nothing now, or closed)."""
        if fd is None:
            return 0
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            close()
            return 0
        consume(data)
        return len(data)

    def _take_out(self, data: bytes) -> None:
        self._stdout += data
        if len(self._stdout) > self._max_out:
            self._stdout.clear()
            self._close_out()
            self.kill(f"action output larger than {self._max_out} bytes")

    def _feed_err(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if not self._err_skipping:
                self._err_buf += data[start:nl]
                self._err_line(bytes(self._err_buf))
            self._err_buf.clear()
            self._err_skipping = False
            start = nl + 1
        if self._err_skipping:
            return
        self._err_buf += data[start:]
        if len(self._err_buf) > MAX_STDERR_LINE_BYTES:
            self._err_line(bytes(self._err_buf[:MAX_STDERR_LINE_BYTES]))
            self._err_buf.clear()
            self._err_skipping = True

    def _err_line(self, raw: bytes) -> None:
        text = self._scrub(raw.decode("utf-8", "replace").rstrip("\r")).strip()
        if not text:
            return
        parsed = protocol.split_log_line(text)
        if parsed is not None:
            if parsed[1].strip():
                self._on_log(*parsed)
        else:
            self._errors.append(text)
            if len(self._errors) > MAX_ERROR_LINES:
                del self._errors[0]

    def _write_in(self) -> None:
        fd = self._in_fd
        if fd is None:
            return
        try:
            while self._in_data:
                n = os.write(fd, self._in_data[:READ_CHUNK_BYTES])
                self._in_data = self._in_data[n:]
        except BlockingIOError:
            return
        except OSError:
            pass  # the program closed its stdin: what it did not read it does not want
        self._close_in()

    def _close_in(self) -> None:
        if self._in_fd is not None:
            self._loop.remove_writer(self._in_fd)
            os.close(self._in_fd)
            self._in_fd = None

    def _close_out(self) -> None:
        if self._out_fd is not None:
            self._loop.remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    def _close_err(self) -> None:
        if self._err_fd is not None:
            self._loop.remove_reader(self._err_fd)
            os.close(self._err_fd)
            self._err_fd = None
        if self._err_buf and not self._err_skipping:
            self._err_line(bytes(self._err_buf))
        self._err_buf.clear()

    def _drain(self) -> None:
        """Read what the action wrote before it exited (bounded: grandchildren may go on)."""
        budget = DRAIN_LIMIT_BYTES
        for read in (self._read_out, self._read_err):
            while budget > 0:
                n = read()
                if n == 0:
                    break
                budget -= n

    # -- exit
    def _poll_reap(self) -> None:
        if not self._reap():
            self._timers.append(self._loop.call_later(REAP_POLL_S, self._poll_reap))

    def _reap(self) -> bool:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return False
        self._finish(os.waitstatus_to_exitcode(status))
        return True

    def _finish(self, status: int) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for timer in self._timers:
            timer.cancel()
        if self._killed:
            self._signal(signal.SIGKILL, leader_alive=False)  # what is left of its group
        self._drain()
        self._close_out()
        self._close_err()
        self._close_in()
        if not self.done.done():
            self.done.set_result(
                Outcome(status, bytes(self._stdout), list(self._errors), self._killed)
            )


Spawned = tuple[int, int, int, int | None]
"""pid, stdout read end, stderr read end, stdin write end (or None)."""


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536


def fork_runner(driver: str, action: str, payload: str, env: dict[str, str]) -> Spawned:
    """Run one of our actions in a forked child: library already imported, own session."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stderr.flush()
    # block the stop signals across fork: the child must not run the parent's handlers
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    if pid == 0:
        _child_main(driver, action, payload, out_w, err_w, env, old_mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(out_w)
    os.close(err_w)
    return pid, out_r, err_r, None


def _child_main(
    driver: str,
    action: str,
    payload: str,
    out_w: int,
    err_w: int,
    env: dict[str, str],
    old_mask: set[signal.Signals],
) -> NoReturn:
    code = runner.EXIT_FAILED
    try:
        os.setsid()
        _end_with_parent(signal.SIGTERM)
        asyncio._set_running_loop(None)  # what Python >= 3.12 does at fork: the loop is ours
        signal.set_wakeup_fd(-1)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, _max_fd())
        os.environ.update(env)
        code = runner.run_action(driver, action, payload)
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the loop
        try:
            msg = f"internal error in {driver} {action}: {type(exc).__name__}\n"
            os.write(2, msg.encode())
        except OSError:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _end_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` when the MAD dies (oned SIGKILLs it 10 s after FINALIZE and
    on a hung stop): the action then cleans up as on any SIGTERM instead of running on for
    nobody. Linux only; elsewhere a killed MAD's actions run to their end."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the MAD died before the request took effect
        os.kill(os.getpid(), sig)


def spawn_program(
    path: str, args: Sequence[str], env: dict[str, str], stdin_data: bytes | None = None
) -> Spawned:
    """Execute any program, upstream style, in its own session; stdin is /dev/null or a pipe."""
    if stdin_data is None:
        in_r, in_w = os.open(os.devnull, os.O_RDONLY), None
    else:
        in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [
        (os.POSIX_SPAWN_DUP2, in_r, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    default_signals = (signal.SIGPIPE, signal.SIGXFSZ, *_STOP_SIGNALS)
    try:
        argv = [path, *args]
        try:
            pid = os.posix_spawn(
                path, argv, env, file_actions=actions, setsid=True,
                setsigdef=default_signals, setsigmask=(),
            )  # fmt: skip
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
            # a script without "#!" line: the stock MAD runs commands through a shell
            pid = os.posix_spawn(
                "/bin/sh", ["/bin/sh", *argv], env, file_actions=actions, setsid=True,
                setsigdef=default_signals, setsigmask=(),
            )  # fmt: skip
    except OSError:
        for fd in (in_w, out_r, err_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    return pid, out_r, err_r, in_w


def is_ours(path: Path) -> bool:
    """True for an action executable that only hands over to onemarket.runner."""
    try:
        with open(path, "rb") as f:
            return OURS_MARKER in f.read(OURS_PROBE_BYTES)
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# oned's stdin


class LineReader:
    """Request lines from a file descriptor, without blocking the loop and with a bounded line.

    A line longer than MAX_LINE_BYTES is reported with only its start (``truncated=True``) so
    that it can still be answered. Regular files and /dev/null cannot be polled; they never
    block either, so they are read one chunk per loop iteration.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_line: Callable[[bytes, bool], None],
        on_eof: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_line = on_line
        self._on_eof = on_eof
        self._buf = bytearray()
        self._skipping = False
        self.closed = False
        try:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._readable)
            self._polled = True
        except (PermissionError, ValueError, OSError):
            self._polled = False
            loop.call_soon(self._readable)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._polled:
                self._loop.remove_reader(self._fd)

    def _readable(self) -> None:
        if self.closed:
            return
        try:
            data = os.read(self._fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log(f"cannot read from oned: {exc.strerror}")
            data = b""
        if not data:
            if self._buf and not self.closed:
                line, truncated = bytes(self._buf), self._skipping
                self._buf.clear()
                self._on_line(line, truncated)
            if not self.closed:
                self.close()
                self._on_eof()
            return
        self._feed(data)
        if not self._polled and not self.closed:
            self._loop.call_soon(self._readable)

    def _feed(self, data: bytes) -> None:
        start = 0
        while not self.closed:
            nl = data.find(b"\n", start)
            self._take(data[start : len(data) if nl < 0 else nl])
            if nl < 0:
                return
            line, truncated = bytes(self._buf), self._skipping
            self._buf.clear()
            self._skipping = False
            start = nl + 1
            self._on_line(line, truncated)

    def _take(self, chunk: bytes) -> None:
        if self._skipping:
            return
        self._buf += chunk
        if len(self._buf) > MAX_LINE_BYTES:
            del self._buf[LINE_PREFIX_BYTES:]
            self._skipping = True


# --------------------------------------------------------------------------------------------
# the driver


def log(message: str) -> None:
    """A line in the MAD's own log (its stderr, which oned keeps in a file)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write(f"{stamp} one_market: {one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def write_all(fd: int, data: bytes) -> None:
    """Write every byte, waiting when the descriptor happens to be non-blocking."""
    import select

    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


@dataclass
class Pending:
    """A request accepted from oned and not answered yet."""

    request: protocol.Request
    cancelled: str = ""
    child: Child | None = None


class Mad:
    """The driver: reads requests, runs at most ``-t`` of them at once, answers each once."""

    def __init__(
        self, options: Options, installation: Installation, out_fd: int, in_fd: int = 0
    ) -> None:
        self.options = options
        self.installation = installation
        self.market_dir = installation.market_remotes
        self.datastore_dir = installation.datastore_remotes
        if options.drivers is not None:
            self.enabled = frozenset(options.drivers)
        else:
            self.enabled = frozenset(self.driver_folders())
        self._out_fd = out_fd
        self._in_fd = in_fd
        self._env = dict.fromkeys(PROXY_VARIABLES, options.proxy) if options.proxy else {}
        self._pending: dict[int, list[Pending]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stdout_broken = False
        self._reader: LineReader | None = None
        self._stopping = ""
        """Why the MAD stops (FINALIZE, EOF, a signal); empty while it serves."""
        self._preloaded = False

    def driver_folders(self) -> list[str]:
        try:
            return sorted(p.name for p in self.market_dir.iterdir() if p.is_dir())
        except OSError:
            return []

    # -- main loop
    async def run(self) -> int:
        """Serve until FINALIZE, EOF or a stop signal; then end every action and return.

        oned's stop (``Driver::stop_driver``) writes FINALIZE and closes both pipes at once, and
        a crashed oned closes them without FINALIZE: either way nobody reads the replies any
        more. So both mean the same here: no queued request is started, running actions are
        SIGTERMed (they clean up as on a timeout), SIGKILLed after STOP_GRACE_S, and the MAD
        returns within STOP_DEADLINE_S.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._sem = asyncio.Semaphore(self.options.concurrency)
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._reader = LineReader(
            loop, self._in_fd, self._on_line, lambda: self.shutdown("oned closed its pipe")
        )
        await self._stop.wait()
        self._reader.close()
        deadline = loop.time() + STOP_DEADLINE_S
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        for task in list(self._tasks):  # children that survive SIGKILL (D state): give up
            task.cancel()
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        return 0

    def shutdown(self, why: str) -> None:
        """Stop serving: close oned's input, fail what is queued, end what runs."""
        if self._stopping:
            return
        self._stopping = why
        busy = sum(1 for same in self._pending.values() for p in same if p.child is not None)
        log(f"stopping ({why}): {busy} running actions ended, queued ones not started")
        if self._reader is not None:
            self._reader.close()
        for id_ in list(self._pending):
            self.cancel(id_, f"the marketplace driver stopped ({why})", STOP_GRACE_S)
        self._stop.set()

    def reply(self, line: str) -> None:
        """One whole line to oned (the loop is single-threaded: lines never interleave)."""
        if self._stdout_broken:
            return
        try:
            write_all(self._out_fd, line.encode("utf-8", "replace"))
        except OSError as exc:
            self._stdout_broken = True
            log(f"cannot write to oned ({exc.strerror}); replies are dropped from now on")

    def _on_line(self, raw: bytes, truncated: bool) -> None:
        try:
            req = protocol.parse_request(raw.decode("utf-8", "replace"))
        except protocol.ProtocolError as exc:
            log(f"ignored a line from oned: {exc}")
            return
        if req.action == "INIT":
            self.reply(protocol.init_success())
            if not self._preloaded:  # after the answer: oned waits only 10 s for it
                self._preloaded = True
                self._loop.call_soon(preload, self.enabled)
        elif req.action == "FINALIZE":
            self.shutdown("oned sent FINALIZE")
        elif self._stopping:
            return  # lines after FINALIZE: oned reads no reply any more
        elif req.action == "DRIVER_CANCEL":
            self.cancel(req.id, "action cancelled by oned")
        elif truncated:
            why = f"action data larger than {MAX_LINE_BYTES} bytes"
            self.reply(protocol.failure(req.action, req.id, why))
        else:
            pending = Pending(req)
            self._pending.setdefault(req.id, []).append(pending)
            task = self._loop.create_task(self._serve(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self, id_: int, reason: str, grace_s: float = KILL_GRACE_S) -> None:
        for pending in self._pending.get(id_, []):
            pending.cancelled = reason
            if pending.child is not None:
                pending.child.kill(reason, grace_s)

    def _on_signal(self, sig: int) -> None:
        self.shutdown(f"{signal.Signals(sig).name} received")

    async def _serve(self, pending: Pending) -> None:
        req = pending.request
        try:
            async with self._sem:
                if pending.cancelled:
                    line = protocol.failure(req.action, req.id, pending.cancelled)
                else:
                    line = await self._handle(pending)
        except Exception as exc:  # noqa: BLE001 - one request must never stop the MAD
            detail = Scrubber([req.payload])(f"{type(exc).__name__}: {exc}")
            log(f"internal error on {req.action} {req.id}: {detail}")
            line = protocol.failure(
                req.action,
                req.id,
                f"internal error in the marketplace driver ({type(exc).__name__})",
            )
        finally:
            same_id = self._pending.get(req.id, [])
            if pending in same_id:
                same_id.remove(pending)
            if not same_id:
                self._pending.pop(req.id, None)
        self.reply(line)

    # -- actions
    async def _handle(self, pending: Pending) -> str:
        req = pending.request
        try:
            data = decode_action(req.payload)
        except MarketError as exc:
            return protocol.failure(req.action, req.id, str(exc))
        driver = data.market.driver
        if req.action == "DELETE" and data.app is not None and data.app.type != APP_TYPE_IMAGE:
            return protocol.success("DELETE", req.id, "-")  # templates have no file, any driver
        if not driver:
            return protocol.failure(req.action, req.id, "action data has no MARKET_MAD")
        if driver not in self.enabled or not _SAFE_NAME_RE.fullmatch(driver):
            shown = one_line(driver, 64)
            return protocol.failure(
                req.action, req.id, f"Marketplace driver '{shown}' not available"
            )
        if req.action == "MONITOR":
            outcome = await self._market_action(pending, driver, "monitor", req.payload)
            return self._result(req, outcome, f"{driver} monitor")
        if req.action == "DELETE":
            outcome = await self._market_action(pending, driver, "delete", req.payload)
            return self._result(req, outcome, f"{driver} delete")
        return await self._import(pending, data, driver)

    async def _import(self, pending: Pending, data: ActionData, driver: str) -> str:
        req = pending.request

        def fail(message: str) -> str:
            return protocol.failure("IMPORT", req.id, message)

        if data.app is None:
            return fail("IMPORT action data has no MARKETPLACEAPP")
        if data.app.type != APP_TYPE_IMAGE:
            return fail(f"apps of type {data.app.type} are not imported by drivers, only images")
        ds_mad = data.datastore.ds_mad if data.datastore is not None else ""
        if not ds_mad:
            return fail("IMPORT action data has no DATASTORE/DS_MAD")
        export = self.datastore_dir / ds_mad / "export"
        if not _SAFE_NAME_RE.fullmatch(ds_mad) or not export.is_file():
            return fail(f"Datastore driver '{one_line(ds_mad, 64)}' not available")
        try:
            ds_payload = data.ds_export_payload()
        except MarketError as exc:
            return fail(str(exc))
        label = f"datastore {ds_mad} export"
        outcome = await self._execute(
            pending,
            label,
            lambda: spawn_program(str(export), [str(req.id)], self._child_env(), ds_payload),
            [ds_payload],
            stdin_data=ds_payload + b"\n",  # a whole line, for scripts that `read` it
            max_stdout=MAX_EXPORT_OUTPUT_BYTES,
        )
        if not outcome.ok:
            return fail(f"Error exporting image to file: {outcome.failure_text(label)}")
        try:
            info = ImportInfo.from_export_output(outcome.stdout)
            payload = data.with_import_info(info).decode("ascii")
        except MarketError as exc:
            return fail(str(exc))
        outcome = await self._market_action(pending, driver, "import", payload)
        if outcome.ok and self._stopping:
            await self._withdraw(req.id, data, driver, outcome.stdout)
            return fail(f"{driver} import withdrawn: {self._stopping}")
        return self._result(req, outcome, f"{driver} import")

    async def _withdraw(self, id_: int, data: ActionData, driver: str, output: bytes) -> None:
        """Delete what an import stored once oned can no longer hear of it (FINALIZE or EOF
        came while it finished): an app nobody knows of would hold its space for ever."""
        try:
            source = parse_template(output).get("SOURCE") or ""
            payload = data.withdrawal_payload(str(source)).decode("ascii")
        except (MarketError, ValueError) as exc:
            log(f"cannot withdraw an import finished after the stop: {exc}")
            return
        if not source:
            return
        fresh = Pending(protocol.Request("DELETE", -1, payload))
        outcome = await self._market_action(fresh, driver, "delete", payload, STOP_GRACE_S)
        state = "withdrew" if outcome.ok else "could not withdraw"
        log(f"{state} what import {id_} stored: it finished after the stop")

    def _result(self, req: protocol.Request, outcome: Outcome, label: str) -> str:
        if not outcome.ok:
            return protocol.failure(req.action, req.id, outcome.failure_text(label))
        if not outcome.stdout.strip():
            return protocol.success(req.action, req.id, "-")
        return protocol.success(req.action, req.id, base64.b64encode(outcome.stdout).decode())

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env)
        return env

    async def _market_action(
        self,
        pending: Pending,
        driver: str,
        action: str,
        payload: str,
        timeout_s: float | None = None,
    ) -> Outcome:
        path = self.market_dir / driver / action
        label = f"{driver} {action}"
        if not path.is_file():
            why = f"Marketplace driver '{driver}' has no {action} action ({path} not found)"
            return Outcome(127, errors=[why])
        if is_ours(path):
            spawn = lambda: fork_runner(driver, action, payload, self._env)  # noqa: E731
        else:
            args = [payload, str(pending.request.id)]
            spawn = lambda: spawn_program(str(path), args, self._child_env())  # noqa: E731
        return await self._execute(
            pending, label, spawn, [payload, pending.request.payload], timeout_s=timeout_s
        )

    async def _execute(
        self,
        pending: Pending,
        label: str,
        spawn: Callable[[], Spawned],
        secrets: Sequence[str | bytes],
        stdin_data: bytes = b"",
        max_stdout: int = MAX_RESULT_BYTES,
        timeout_s: float | None = None,
    ) -> Outcome:
        if pending.cancelled:
            return Outcome(1, killed=pending.cancelled)
        id_ = pending.request.id
        try:
            pid, out_fd, err_fd, in_fd = spawn()
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                why = "its action data is too large for a command-line argument"
            else:
                why = exc.strerror or type(exc).__name__
            return Outcome(127, errors=[f"cannot run {label}: {why}"])
        child = Child(
            self._loop,
            pid,
            out_fd,
            err_fd,
            on_log=lambda sev, msg: self.reply(protocol.log(id_, sev, msg)),
            scrub=Scrubber(secrets),
            stdin_fd=in_fd,
            stdin_data=stdin_data,
            max_stdout=max_stdout,
        )
        pending.child = child
        limit = timeout_s or self.options.timeout_s
        if limit:
            child.set_timeout(limit, f"{label} timed out after {limit:g} s")
        try:
            return await child.done
        finally:
            pending.child = None


def preload(drivers: frozenset[str]) -> None:
    """Import the backends of the enabled drivers once, so forked actions start warm."""
    for name in sorted(drivers & DRIVERS.keys()):
        # a driver that cannot load fails with a clear message in its own actions
        with contextlib.suppress(Exception):
            backend_class(name)


def main(options: Options) -> int:
    """Run the MAD with parsed options (``onemarket.madstart`` parses them as oned gives them)."""
    installation = Installation.detect()
    # replies go to a private copy of stdout; fd 1 becomes stderr, so that nothing printed
    # by a library can corrupt the conversation with oned
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    mad = Mad(options, installation, out_fd)
    log(
        f"started: remotes {installation.remotes}, drivers {','.join(sorted(mad.enabled)) or '-'}"
        f", {options.concurrency} at once, timeout {options.timeout_s or 'none'}"
    )
    code = asyncio.run(mad.run())
    log("finished")
    return code


if __name__ == "__main__":
    from .madstart import main as start

    sys.exit(start())
