"""Shared fixtures. Server fixtures live in tests/servers/ and are imported here."""

import signal

import pytest

from tests.servers import without_proxies
from tests.servers.fake_oned import fake_oned  # noqa: F401
from tests.servers.httpd import httpd  # noqa: F401
from tests.servers.nginx import nginx  # noqa: F401
from tests.servers.oned import oned  # noqa: F401
from tests.servers.rgw import rgw  # noqa: F401
from tests.servers.sshd import sshd  # noqa: F401

# server fixtures: one import line per module of tests/servers/ (keep this list sorted)


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests reach only loopback: no proxy of the machine running them is in the way (a test
    of proxies sets its own)."""
    without_proxies(monkeypatch)


def pytest_configure(config: pytest.Config) -> None:
    """The stop-signal tests send SIGINT and SIGHUP to the programs they start, which inherit
    an ignored disposition: run under nohup or as a background job (SIGINT ignored), they
    would wait for ever. The suite's processes get the defaults back."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
