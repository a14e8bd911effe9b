"""An oned simulator: install into a temporary ONE_LOCATION, spawn the MAD, talk to it.

``install.sh -d DIR -P <this interpreter>`` builds the layout oned would use (``lib/mads``,
``var/remotes``); :class:`MadProcess` starts ``lib/mads/one_market`` exactly as oned's
``Driver`` does (one-word ARGUMENTS, fd 2 closed, the INIT handshake, restart on EOF, the stop
sequence), writes oned's request lines, and collects replies and ``LOG`` lines with a listener
thread, so that every wait is bounded and the MAD never blocks on a full stdout pipe. The
requests' action data comes from :mod:`tests.payloads`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SH = REPO / "install.sh"
INSTALL_TIMEOUT_S = 120.0
LINE_TIMEOUT_S = 30.0
"""Longest wait for one line from the MAD (generous: CI machines can be slow)."""
EXIT_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------------------------
# the MAD's answers


@dataclass(frozen=True)
class Reply:
    action: str
    result: str
    id: int
    info: str

    @property
    def ok(self) -> bool:
        return self.result == "SUCCESS"

    def decoded(self) -> bytes:
        return base64.b64decode(self.info, validate=True) if self.info != "-" else b""


@dataclass(frozen=True)
class LogLine:
    severity: str
    id: int
    message: str


def parse_reply(line: str) -> Reply:
    """A reply line, split as oned does; AssertionError when it is not well formed."""
    assert line.endswith("\n") and line.count("\n") == 1, f"not one line: {line!r}"
    parts = line[:-1].split(" ", 3)
    assert len(parts) == 4, f"reply without 4 fields: {line!r}"
    action, result, id_, info = parts
    assert result in ("SUCCESS", "FAILURE"), f"bad result in {line!r}"
    assert info and "\r" not in info, f"empty info in {line!r}"
    return Reply(action, result, int(id_), info)


def parse_log(line: str) -> LogLine:
    parts = line[:-1].split(" ", 3)
    assert parts[0] == "LOG" and len(parts) == 4 and parts[1] in "IEWD", line
    return LogLine(parts[1], int(parts[2]), parts[3])


ONED_SIGNAL_MASK = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
"""The signal mask oned's driver-starting thread has: everything blocked."""


class DriverInitError(AssertionError):
    """oned would refuse the MAD at start (``Driver::start_driver`` returned -1)."""


class MadProcess:
    """oned's ``Driver`` object (OpenNebula ``include/Driver.h``) around one MAD process.

    Each rule cites master:include/Driver.h (same in one-6.10 and one-7.x):

    - the MAD inherits oned's signal mask: every signal blocked (src/nebula/Nebula.cc
      l.690-692, before the managers start drivers).
    - start_driver: two pipes, fork; in the child dup2 to fds 0 and 1, ``close(2)`` (l.283)
      and ``execlp(cmd, cmd, arg.c_str(), NULL)`` (l.285): ARGUMENTS is ONE argv word, even
      when empty. The child inherits oned's environment and working directory.
    - INIT (l.305-349): write ``INIT\\n``, ``select`` at most 10 s (l.314), ONE ``read`` of at
      most 31 bytes (l.327), first two words must be ``INIT SUCCESS`` (l.344); any bytes of
      that read after them are lost.
    - listener (l.356-375): reads reply lines; at EOF of the MAD's stdout while oned is not
      stopping, ``stop_driver(1)`` then ``start_driver`` (a restart, INIT again).
    - stop_driver(secs) (l.203-238): write ``FINALIZE\\n``, close both pipes at once, poll
      ``waitpid(WNOHANG)`` once a second ``secs`` times, then ``kill(pid, SIGKILL)`` of the
      MAD's pid only. oned stops the market driver with 10 s (MarketPlaceManager.h
      ``drivers_timeout``, l.219) and restarts with 1 s.

    Not reproduced: oned's listener thread, blocked in ``read`` when ``stop_driver`` closes the
    pipe, may still read one last chunk the MAD writes after FINALIZE (StringBuffer.h); it
    never reaps a SIGKILLed MAD (a zombie stays); the shipped defaultrc leaves ONE_MAD_DEBUG
    empty (set here by default, so tests can read the MAD's log).
    """

    INIT_TIMEOUT_S = 10.0
    INIT_READ_BYTES = 31
    SHUTDOWN_SECS = 10
    RESTART_SECS = 1

    def __init__(
        self, command: str, argument: str, env: dict[str, str], log_path: Path, cwd: Path,
        restart: bool = True,
    ) -> None:  # fmt: skip
        self.command = command
        self.argument = argument
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        self.restart_on_eof = restart
        self.lines: list[str] = []
        """Every stdout line oned read, in order (replies and LOG lines)."""
        self.logs: list[LogLine] = []
        self.restarts = 0
        self.exit_statuses: list[int] = []
        """Exit status of every MAD process stop_driver saw end (-9: oned SIGKILLed it)."""
        self.init_answer = b""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._terminate = False
        self._lock = threading.Lock()
        self.pid = -1
        self.to_drv = -1
        self.from_drv = -1
        self._wake_r, self._wake_w = os.pipe()
        self._released = threading.Event()
        try:
            self._start_driver()
        except DriverInitError:
            self.close()
            raise
        self._thread = threading.Thread(target=self._listener, daemon=True)
        self._thread.start()

    # -- Driver::start_driver
    def _start_driver(self) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        actions = [
            (os.POSIX_SPAWN_DUP2, to_r, 0),
            (os.POSIX_SPAWN_DUP2, from_w, 1),
            (os.POSIX_SPAWN_CLOSE, 2),
        ]
        old_cwd = os.getcwd()
        os.chdir(self.cwd)  # posix_spawn has no cwd: the child starts in oned's folder
        try:
            # oned's threads run with every signal blocked (src/nebula/Nebula.cc, before the
            # managers start), and the mask is inherited through fork and exec
            self.pid = os.posix_spawnp(
                self.command, [self.command, self.argument], self.env, file_actions=actions,
                setsigmask=ONED_SIGNAL_MASK,
            )  # fmt: skip
        finally:
            os.chdir(old_cwd)
            os.close(to_r)
            os.close(from_w)
        self.to_drv, self.from_drv = to_w, from_r
        os.write(self.to_drv, b"INIT\n")
        ready = select.select([self.from_drv], [], [], self.INIT_TIMEOUT_S)[0]
        if not ready:
            raise DriverInitError("Driver initialization time out")
        self.init_answer = os.read(self.from_drv, self.INIT_READ_BYTES)
        words = self.init_answer.decode("ascii", "replace").split()
        if words[:2] != ["INIT", "SUCCESS"]:
            raise DriverInitError(
                f"Driver initialization failed, expected INIT SUCCESS message "
                f"(got {self.init_answer!r}); MAD log:\n{self.log_text()}"
            )

    # -- Driver::stop_driver
    def stop_driver(self, secs: int) -> int | None:
        """FINALIZE, close both pipes, wait ``secs`` polls, SIGKILL: the exit status seen."""
        with self._lock:
            if self.pid == -1:
                return None
            with contextlib.suppress(OSError):
                os.write(self.to_drv, b"FINALIZE\n")
            self._close_pipes()
            status = None
            for _ in range(secs):
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
                if pid != 0:
                    status = os.waitstatus_to_exitcode(raw)
                    break
                time.sleep(1)
            if status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            self.exit_statuses.append(status)
            self.pid = -1
            return status

    def _close_pipes(self) -> None:
        """Close both ends oned holds; the listener lets go of ``from_drv`` first."""
        if self.to_drv != -1:
            os.close(self.to_drv)
            self.to_drv = -1
        fd, self.from_drv = self.from_drv, -1
        if fd == -1:
            return
        if threading.current_thread() is not getattr(self, "_thread", None):
            os.write(self._wake_w, b"x")
            self._released.wait(EXIT_TIMEOUT_S)
        os.close(fd)

    # -- the listener thread (Driver::start_listener)
    def _listener(self) -> None:
        try:
            self._listen()
        finally:
            self._queue.put(None)
            self._released.set()

    def _listen(self) -> None:
        buf = b""
        while True:
            fd = self.from_drv
            if fd == -1:
                return
            ready = select.select([fd, self._wake_r], [], [])[0]
            if self._wake_r in ready:
                return  # another thread is closing the pipes: oned reads no more
            data = os.read(fd, 65536)
            if data:
                *complete, buf = (buf + data).split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace") + "\n"
                    self.lines.append(line)
                    self._queue.put(line)
                continue
            # EOF: the MAD died or closed its stdout; oned restarts it unless it is stopping
            buf = b""
            if self._terminate or not self.restart_on_eof:
                return
            self.stop_driver(self.RESTART_SECS)
            self.restarts += 1
            self._start_driver()

    # -- oned -> MAD
    def send(self, *lines: str) -> None:
        """Write request lines at once (one write, as a burst from oned)."""
        self.send_raw("".join(f"{line}\n" for line in lines).encode())

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (garbage, invalid UTF-8, NUL...); oned ignores EPIPE."""
        view = memoryview(data)
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(self.to_drv, view) :]

    def request(self, action: str, id_: int, payload: str) -> None:
        """A request the way oned writes it: empty status, so two blanks after the action."""
        self.send(f"{action}  {id_} {payload}")

    def close_stdin(self) -> None:
        """Close oned's write end only (the MAD sees EOF; replies are still read)."""
        if self.to_drv != -1:
            os.close(self.to_drv)
            self.to_drv = -1

    def crash(self) -> None:
        """oned dies: both pipes close at once, without FINALIZE, and nothing is restarted."""
        self._terminate = True
        with self._lock:
            self._close_pipes()

    # -- MAD -> oned
    def next_line(self, timeout_s: float = LINE_TIMEOUT_S) -> str | None:
        """The next stdout line, None at end of output; fails after ``timeout_s``."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no line from the MAD within {timeout_s} s; its log:\n{self.log_text()}")

    def reply(self, timeout_s: float = LINE_TIMEOUT_S) -> Reply:
        """The next reply; LOG lines met on the way are kept in ``logs``."""
        while True:
            line = self.next_line(timeout_s)
            assert line is not None, f"MAD output ended; its log:\n{self.log_text()}"
            if line.startswith("LOG "):
                self.logs.append(parse_log(line))
                continue
            return parse_reply(line)

    def replies(self, count: int, timeout_s: float = LINE_TIMEOUT_S) -> list[Reply]:
        return [self.reply(timeout_s) for _ in range(count)]

    def finalize(self, secs: int = SHUTDOWN_SECS) -> int | None:
        """oned's shutdown: ``stop_driver(10)``; the MAD's exit status (-9 if oned killed it)."""
        self._terminate = True
        return self.stop_driver(secs)

    def wait(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the MAD to exit on its own (oned does not; tests do)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self.pid == -1:
                    return self.exit_statuses[-1]
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
                if pid != 0:
                    status = os.waitstatus_to_exitcode(raw)
                    self.exit_statuses.append(status)
                    self.pid = -1
                    return status
            if time.monotonic() > deadline:
                pytest.fail(f"MAD still running after {timeout_s} s; its log:\n{self.log_text()}")
            time.sleep(0.02)

    def rest(self, timeout_s: float = LINE_TIMEOUT_S) -> list[str]:
        """Every line left once the MAD's output ended."""
        out = []
        while (line := self.next_line(timeout_s)) is not None:
            out.append(line)
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self._terminate = True
        if self.pid != -1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with self._lock:
            self._close_pipes()
            if self.pid != -1:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                self.pid = -1
        if hasattr(self, "_thread"):
            self._thread.join(timeout=EXIT_TIMEOUT_S)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# ----------------------------------------------------------------------------------------------
# the installation


@dataclass
class OneLocation:
    """A self-contained OpenNebula layout holding our MAD and remotes."""

    root: Path
    started: list[MadProcess] = field(default_factory=list)

    @property
    def remotes(self) -> Path:
        return self.root / "var" / "remotes"

    @property
    def mad(self) -> Path:
        return self.root / "lib" / "mads" / "one_market"

    def add_driver(self, name: str, scripts: dict[str, str]) -> Path:
        """A custom driver folder ``remotes/market/<name>`` with executable scripts."""
        return self._add(self.remotes / "market" / name, scripts)

    def add_datastore(self, name: str, export_script: str) -> Path:
        """A datastore driver ``remotes/datastore/<name>`` with just an ``export``."""
        return self._add(self.remotes / "datastore" / name, {"export": export_script})

    @staticmethod
    def _add(folder: Path, scripts: dict[str, str]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for action, text in scripts.items():
            path = folder / action
            path.write_text(text)
            path.chmod(0o755)
        return folder

    def start(
        self, *words: str, env: dict[str, str] | None = None, restart: bool = True
    ) -> MadProcess:
        """Start the MAD as oned does, INIT included (DriverInitError if oned would refuse it).

        ``words`` are oned.conf's ARGUMENTS: joined into the ONE argv word oned passes.
        """
        full_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        full_env["ONE_LOCATION"] = str(self.root)
        full_env.update(env or {})
        # ONE_MAD_DEBUG: the MAD wrapper appends the MAD's stderr to var/one_market.log, as the
        # stock wrapper does
        full_env.setdefault("ONE_MAD_DEBUG", "1")
        log_path = self.root / "var" / "one_market.log"
        cwd = self.root / "oned-cwd"
        cwd.mkdir(exist_ok=True)
        mad = MadProcess(str(self.mad), " ".join(words), full_env, log_path, cwd, restart)
        self.started.append(mad)
        return mad


def install(root: Path) -> OneLocation:
    """Run ``install.sh -d root -P <this python>``, as an administrator would."""
    proc = subprocess.run(
        [str(INSTALL_SH), "-d", str(root), "-P", sys.executable],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"install.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return OneLocation(root)


@pytest.fixture
def oned(tmp_path: Path) -> Iterator[OneLocation]:
    """A fresh ONE_LOCATION; every MAD started from it is stopped at the end."""
    location = install(tmp_path / "one")
    yield location
    for mad in location.started:
        mad.close()
