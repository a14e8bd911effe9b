"""Real servers the tests start on loopback (nginx, sshd, Ceph RGW, catalog web servers, oned).

Each server module has a class with ``start()``/``stop()`` and a pytest fixture. When a program
is missing, :func:`need` skips the test with a message naming the Debian package, except in
CI (``CI=true``), where everything must run and a missing program fails the test. Servers run
as one foreground process (:func:`start_process` / :func:`stop_process`) or as a Python server
in a thread of the test process (:func:`serve_in_thread` / :func:`stop_serving`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT_S = 20.0
"""Longest wait for a server process to accept connections."""
STOP_TIMEOUT_S = 10.0
"""Grace after SIGTERM before SIGKILL, and after SIGKILL before giving up."""
SERVE_POLL_S = 0.05
"""How often a threaded server checks for shutdown (the wait of each ``stop_serving``)."""


def need(condition: bool, what: str) -> None:
    """Skip (or, in CI, fail) unless ``condition`` holds; ``what`` names what is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} (CI=true: every test must run)")
    pytest.skip(what)


def need_program(program: str, package: str) -> str:
    """Path of ``program`` (also looked up in sbin folders), skipping when it is not installed."""
    path = shutil.which(program) or shutil.which(
        program, path="/usr/sbin:/sbin:/usr/local/sbin:/usr/bin"
    )
    need(path is not None, f"{program} not installed (Debian package {package})")
    assert path is not None
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout_s: float = 20.0) -> bool:
    """True once something accepts connections on ``host:port`` (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_process(
    command: list[str], log: Path, port: int, what: str, errors: Path | None = None
) -> subprocess.Popen[bytes]:
    """Run ``command``, a server staying in the foreground, with its output in ``log``.

    Returns once it accepts connections on ``port``; otherwise stops it and raises
    RuntimeError with the end of ``errors`` (default: ``log``), ``what`` naming the server.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if not wait_for_port(port, timeout_s=START_TIMEOUT_S):
        stop_process(proc)
        tail = (errors or log).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} did not start on port {port}: {tail}")
    return proc


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM ``proc`` and wait for it, SIGKILL when it outlives the grace period."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


def serve_in_thread(server: socketserver.BaseServer) -> threading.Thread:
    """Run ``server`` (bound already) in a daemon thread until :func:`stop_serving`."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    return thread


def stop_serving(server: socketserver.BaseServer) -> None:
    """Stop a server started by :func:`serve_in_thread` and close its socket."""
    server.shutdown()
    server.server_close()


PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
"""The proxy settings requests and curl read from the environment (either case)."""


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_bytes: int) -> Iterator[bool]:
    """``folder`` made and, as root, a tmpfs of ``size_bytes`` mounted on it (a disk to fill
    up); yields whether it is mounted, and unmounts it at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_bytes},mode=0755"
    argv = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)]
    mounted = os.geteuid() == 0 and subprocess.run(argv, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback traffic must not go through a proxy configured on the machine running the tests."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=Startable)


@contextlib.contextmanager
def running(server: _S) -> Iterator[_S]:
    """``server`` started, and stopped when the block (a test, a fixture's scope) ends."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
