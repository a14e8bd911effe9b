"""Running one action: spawn it in its own session, read its pipes as it writes, reap it.

Our own actions (``remotes/market/<driver>/<action>`` scripts that call ``onemarket.runner``)
run in a forked child of the MAD, which imported the library once and hands over the action
data already decoded: the cost of an action is a fork, not an interpreter start. Any other
executable, and the datastore ``export``, is executed the way the stock MAD does it.

The pipes are read through asyncio's pipe transports (``connect_read_pipe`` with a protocol, as
``asyncio.subprocess`` does); the exit is seen through a pidfd. A child's stderr is split into
lines at once: ``INFO:``/``WARN:``/``ERROR:``/``DEBUG:`` lines become ``LOG`` messages while it
runs, the other lines become the failure text.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .. import protocol, runner
from ..action import ActionData
from .failures import Outcome
from .lines import LineSplitter

KILL_GRACE_S = 10.0
"""Time a timed-out or cancelled action gets between SIGTERM and SIGKILL: enough for an import
to remove its temporary file or abort its multipart upload (a few requests)."""
MAX_RESULT_BYTES = 64 * 1024 * 1024
"""Largest stdout accepted from one action; it is held in memory until the reply is sent."""
MAX_STDERR_LINE_BYTES = 64 * 1024
"""Longest stderr line buffered from an action; the rest of a longer line is dropped."""
MAX_ERROR_LINES = 100
"""Plain stderr lines kept for the failure text, the last ones (the cause usually comes last);
the text is then cut to protocol.MAX_FAILURE_CHARS."""
DRAIN_TIMEOUT_S = 0.5
"""Once an action has exited, how long its pipes may stay open (a grandchild holding them)
before what they carried so far is taken as all; the usual case closes at once."""
REAP_POLL_S = 0.05
"""Poll interval for exited children, only where pidfd_open is not available."""
OURS_PROBE_BYTES = 4096
"""Bytes of an action executable read to recognise one of ours."""
OURS_MARKER = b"onemarket.runner"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop the MAD; children get them back at their default action."""
EXPORT_ANSWER_FD = 3
"""Where a forked overlapped import reads the datastore export's answer (above stdio)."""
PR_SET_PDEATHSIG = 1
"""prctl(2) option: a signal the kernel sends a child when its parent dies."""

LogCallback = Callable[[str, str], None]
Spawned = tuple[int, int, int, int | None]
"""pid, stdout read end, stderr read end, stdin write end (or None)."""


class _Pipe(asyncio.Protocol):
    """Hands what a pipe carries to ``on_data`` and says when it closed."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.closed = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class Child:
    """A running action; :meth:`outcome` waits for its end and says how it went."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        on_log: LogCallback,
        scrub: Callable[[str], str],
        max_stdout: int = MAX_RESULT_BYTES,
    ) -> None:
        self.pid = pid
        self._loop = loop
        self._on_log = on_log
        self._scrub = scrub
        self._max_out = max_stdout
        self._stdout = bytearray()
        self._errors: list[str] = []
        self._err_lines = LineSplitter(MAX_STDERR_LINE_BYTES, MAX_STDERR_LINE_BYTES)
        self._killed = ""
        self._timers: list[asyncio.TimerHandle] = []
        self._timeout: asyncio.TimerHandle | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._pipes: list[_Pipe] = []
        self._out_pipe: _Pipe | None = None
        self._out_full = False
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None

    @classmethod
    async def start(
        cls,
        spawned: Spawned,
        on_log: LogCallback,
        scrub: Callable[[str], str],
        stdin_data: bytes = b"",
        max_stdout: int = MAX_RESULT_BYTES,
    ) -> Child:
        loop = asyncio.get_running_loop()
        pid, out_fd, err_fd, in_fd = spawned
        child = cls(loop, pid, on_log, scrub, max_stdout)
        child._watch_exit()
        child._out_pipe = await child._read(out_fd, child._take_out)
        await child._read(err_fd, child._take_err)
        if in_fd is not None:
            transport, _ = await loop.connect_write_pipe(
                asyncio.BaseProtocol,
                open(in_fd, "wb", buffering=0),  # noqa: SIM115 - the transport owns it
            )
            child._transports.append(transport)
            # what the program does not read it does not want: a closed stdin is no error
            transport.write(stdin_data)
            transport.close()
        return child

    async def _read(self, fd: int, consume: Callable[[bytes], None]) -> _Pipe:
        pipe = _Pipe(consume)
        self._pipes.append(pipe)
        pipe_file = open(fd, "rb", buffering=0)  # noqa: SIM115 - the transport owns and closes it
        transport, _ = await self._loop.connect_read_pipe(lambda: pipe, pipe_file)
        self._transports.append(transport)
        return pipe

    # -- control
    def set_timeout(self, seconds: float, reason: str) -> None:
        """Kill the child ``seconds`` from now; a new limit replaces the one set before."""
        if self._timeout is not None:
            self._timeout.cancel()
        self._timeout = self._loop.call_later(seconds, self.kill, reason)
        self._timers.append(self._timeout)

    def kill(self, reason: str, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM the whole process group now, SIGKILL it after ``grace_s``."""
        if self._exited.done() or self._killed:
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

    # -- output
    def _take_out(self, data: bytes) -> None:
        if self._out_full:
            return
        self._stdout += data
        if len(self._stdout) > self._max_out:
            self._out_full = True
            self._stdout.clear()
            transport = self._out_pipe.transport if self._out_pipe is not None else None
            if transport is not None:
                transport.close()
            self.kill(f"action output larger than {self._max_out} bytes")

    def _take_err(self, data: bytes) -> None:
        for raw, _cut in self._err_lines.feed(data):
            self._err_line(raw)

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

    # -- exit
    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._timers.append(self._loop.call_later(REAP_POLL_S, self._poll_reap))
        else:
            self._loop.add_reader(self._pidfd, self._reap)

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
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for timer in self._timers:
            timer.cancel()
        if not self._exited.done():
            self._exited.set_result(os.waitstatus_to_exitcode(status))
        return True

    async def outcome(self) -> Outcome:
        """Wait for the exit and for what the pipes still carry (bounded); then close them."""
        try:
            status = await self._exited
            if self._killed:
                self._signal(signal.SIGKILL, leader_alive=False)  # what is left of its group
            waits = [asyncio.ensure_future(p.closed.wait()) for p in self._pipes]
            _done, late = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT_S)
            for wait in late:
                wait.cancel()
        finally:
            for transport in self._transports:
                transport.close()
        for raw, _cut in self._err_lines.finish():
            self._err_line(raw)
        return Outcome(status, bytes(self._stdout), list(self._errors), self._killed)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536


def fork_runner(
    driver: str,
    action: str,
    data: ActionData,
    env: dict[str, str],
    export_fd: int | None = None,
) -> Spawned:
    """Run one of our actions in a forked child: library imported, action data decoded.

    The child runs no asyncio code (it would see the MAD's loop as running) and closes every
    inherited descriptor but its pipes, and ``export_fd`` (the read end the MAD writes the
    export's answer to, for an overlapped import) as :data:`EXPORT_ANSWER_FD`.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stderr.flush()
    # block the stop signals across fork: the child must not run the parent's handlers
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    if pid == 0:
        _child_main(driver, action, data, out_w, err_w, env, old_mask, export_fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(out_w)
    os.close(err_w)
    return pid, out_r, err_r, None


def _child_main(
    driver: str,
    action: str,
    data: ActionData,
    out_w: int,
    err_w: int,
    env: dict[str, str],
    old_mask: set[signal.Signals],
    export_fd: int | None,
) -> NoReturn:
    code = runner.EXIT_FAILED
    try:
        os.setsid()
        _end_with_parent(signal.SIGTERM)
        signal.set_wakeup_fd(-1)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        if export_fd is not None:
            os.dup2(export_fd, EXPORT_ANSWER_FD)
            export_fd = EXPORT_ANSWER_FD
        os.closerange(3 if export_fd is None else EXPORT_ANSWER_FD + 1, _max_fd())
        os.environ.update(env)
        code = runner.run_action(driver, action, data, export_fd=export_fd)
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
    default_signals = (signal.SIGPIPE, signal.SIGXFSZ, *STOP_SIGNALS)
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
