"""An oned simulator: install into a temporary ONE_LOCATION, spawn the MAD, talk to it.

``install.sh -d DIR -P <this interpreter>`` builds the layout oned would use (``lib/mads``,
``var/remotes``); :class:`MadProcess` runs ``lib/mads/one_market`` with real pipes, writes
oned's request lines, and collects replies and ``LOG`` lines with a reader thread, so that
every wait is bounded and the MAD never blocks on a full stdout pipe. The requests' action
data comes from :mod:`tests.payloads`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import subprocess
import sys
import threading
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


class MadProcess:
    """A running MAD with oned's side of its pipes."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.lines: list[str] = []
        """Every stdout line, in order (replies and LOG lines)."""
        self.logs: list[LogLine] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read_stdout, daemon=True)
        self._thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    # -- oned -> MAD
    def send(self, *lines: str) -> None:
        """Write request lines at once (one write, as a burst from oned)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (garbage, invalid UTF-8, NUL...)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, action: str, id_: int, payload: str) -> None:
        """A request the way oned writes it: empty status, so two blanks after the action."""
        self.send(f"{action}  {id_} {payload}")

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

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

    def finalize(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Send FINALIZE and wait for the exit status."""
        self.send("FINALIZE")
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"MAD still running after {timeout_s} s; its log:\n{self.log_text()}")

    def rest(self, timeout_s: float = LINE_TIMEOUT_S) -> list[str]:
        """Every line left once the MAD has exited."""
        out = []
        while (line := self.next_line(timeout_s)) is not None:
            out.append(line)
        return out

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self._thread.join(timeout=EXIT_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


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

    def start(self, *args: str, env: dict[str, str] | None = None) -> MadProcess:
        """Spawn the MAD as oned does (ONE_LOCATION set, pipes on stdin and stdout)."""
        full_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        full_env["ONE_LOCATION"] = str(self.root)
        full_env.update(env or {})
        # ONE_MAD_DEBUG: the MAD wrapper appends the MAD's stderr to var/one_market.log, as the
        # stock wrapper does; the wrapper's own stderr goes to the same file
        full_env.setdefault("ONE_MAD_DEBUG", "1")
        log_path = self.root / "var" / "one_market.log"
        mad = MadProcess([str(self.mad), *args], full_env, log_path)
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
