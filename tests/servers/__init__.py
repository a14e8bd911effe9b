"""Real servers the tests start on loopback (nginx, sshd, Ceph RGW, catalog web servers, oned).

Each server module has a class with ``start()``/``stop()`` and a pytest fixture. When a program
is missing, :func:`need` skips the test with a message naming the Debian package, except in
CI (``CI=true``), where everything must run and a missing program fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


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
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
