"""Shared fixtures. Server fixtures live in tests/servers/ and are imported here."""

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
