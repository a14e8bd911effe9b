"""One masking rule for every message and log line: URL passwords, registered secrets, controls.

Each case the exploratory tests found has a test here: a BASE_URL password in a delete or
check message (a), an endpoint password in a failure of another module (b), a long password
cut before it was masked (c), a backslash doubled by ``repr()`` (d), a C1 control (CSI) that
reached oned (e).
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
import requests
from onemarket import driverlog, protocol
from onemarket.action import App, Market
from onemarket.backends.base import Context
from onemarket.backends.http_folder import HttpFolderBackend
from onemarket.errors import MAX_MESSAGE_CHARS, ConfigError, RemoteError, UnsafePathError, one_line
from onemarket.installation import Installation
from onemarket.location import HttpLocation
from onemarket.units import shown

PASSWORD = "S3cretPassw0rd"


@pytest.fixture(autouse=True)
def _no_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers what it needs: the URL rule must work without any."""
    monkeypatch.setattr(driverlog, "_secrets", ())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ the URL rule


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"http://alice:{PASSWORD}@127.0.0.1:9/apps", "http://alice:****@127.0.0.1:9/apps"),
        ("https://u:p@ss:w@rd@host/x", "https://u:****@host/x"),  # urlsplit: the last @
        ("ftp://u:pa\\\\ss\\\\word1@h/x", "ftp://u:****@h/x"),  # repr() doubled them
        ("http://u:pa'ss\"%40#?@h", "http://u:****@h"),
        ("redis://:only-a-password@h:6379", "redis://:****@h:6379"),
        ("git+ssh://u:pw@h/r and s3+http://k:v@h", "git+ssh://u:****@h/r and s3+http://k:****@h"),
        ("'lxd:http://u:pw@127.0.0.1/x'", "'lxd:http://u:****@127.0.0.1/x'"),
        ("x2http://u:pw@h", "x2http://u:****@h"),
        (
            "http://me@corp.com:hunter2pw@files.example/apps",
            "http://me@corp.com:****@files.example/apps",
        ),
    ],
)
def test_url_passwords_are_masked_whatever_they_hold(text: str, masked: str) -> None:
    assert driverlog.scrub(text) == masked
    assert one_line(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "ssh://host:/path",
        "ssh://host:22/srv/img",
        "ssh://root@host/srv/img",
        "ssh://root@host:22/srv/img",
        "root@host:/srv/img.qcow2",
        "s3://bucket/key@v1",
        "http://host:8080/x",
        "http://host:8080/x?mail=a@b.c",
        "http://[::1]:8080/a@b",
        "https://token-as-user@host/x",
        "lxd://images/ubuntu:24.04@amd64",
        "mailto:admin@example.org and host:port@x",
    ],
)
def test_urls_without_a_password_are_left_alone(text: str) -> None:
    assert driverlog.scrub(text) == text
    assert one_line(text) == text


def test_a_long_line_of_url_characters_is_fast() -> None:
    """The scheme is matched once per run, not once per character (no quadratic scan)."""
    line = "https://h/ " + "A" * 200_000 + "://x"
    assert driverlog.scrub(line) == line  # would take minutes with a per-character scan


# ------------------------------------------------------------------------ (a) BASE_URL


def _http_backend(base_url: str, public_dir: Path) -> HttpFolderBackend:
    market = Market(100, "private", "http", {"BASE_URL": base_url, "PUBLIC_DIR": str(public_dir)})
    return HttpFolderBackend(market, Context(Installation.detect()))


def test_delete_outside_base_url_masks_its_password(tmp_path: Path) -> None:
    b = _http_backend(f"http://alice:{PASSWORD}@127.0.0.1:9/apps", tmp_path)
    with pytest.raises(UnsafePathError) as caught:
        b.delete_app(App(id=3, name="a", source="http://elsewhere/app-3-abc"))
    assert str(caught.value) == (
        "SOURCE 'http://elsewhere/app-3-abc' is not under BASE_URL "
        "'http://alice:****@127.0.0.1:9/apps'"
    )


def test_source_under_a_long_password_is_masked_before_its_cut() -> None:
    base = f"http://alice:{'P' * 300}@127.0.0.1/apps"
    with pytest.raises(UnsafePathError) as caught:
        HttpLocation.parse(base + "/x?y", base)
    assert "PPPP" not in str(caught.value) and "alice:****@127.0.0.1/apps/x?y" in str(caught.value)


def test_check_of_an_unreachable_base_url_masks_its_password(tmp_path: Path) -> None:
    """What ``one-market check`` prints is the check's detail through ``one_line``."""
    b = _http_backend(f"http://alice:{PASSWORD}@127.0.0.1:{_closed_port()}/apps", tmp_path)
    details = [one_line(c.detail) for c in b.check()]
    served = [d for d in details if d.startswith("GET ")]
    assert served and "alice:****@127.0.0.1" in served[0], details
    assert not any(PASSWORD in d for d in details)


@pytest.mark.parametrize("password", [PASSWORD, "pa\\ss\\word1", "V" * 200])
def test_a_base_url_of_another_scheme_masks_its_password(tmp_path: Path, password: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _http_backend(f"ftp://alice:{password}@127.0.0.1/apps", tmp_path)
    assert password not in str(caught.value) and "alice:****@" in str(caught.value)
    assert "VVVV" not in str(caught.value)


# ------------------------------------------------------------------------ (b) other modules


def test_a_library_error_quoting_an_endpoint_is_masked() -> None:
    """requests' own text (pyone, oneclient's catch-all) carries the URL as given."""
    url = "http://u:XmlRpcPassw0rd@127.0.0.1:99999/RPC2"
    with pytest.raises(requests.RequestException) as caught:
        requests.get(url, timeout=1)
    assert "XmlRpcPassw0rd" in str(caught.value)  # the library shows it ...
    from onemarket import oneclient

    shown = oneclient.describe_failure(caught.value)
    assert "XmlRpcPassw0rd" not in shown and "u:****@127.0.0.1:99999" in shown
    assert "XmlRpcPassw0rd" not in str(RemoteError(f"oned: {caught.value}"))


# ------------------------------------------------------------------------ (c) the cut


def test_a_url_password_is_masked_before_the_message_is_cut() -> None:
    long_pw = "VeryLongPassword" * 200
    exc = RemoteError(f"cannot reach S3 at http://u:{long_pw}@127.0.0.1:1/b: refused")
    assert str(exc) == "cannot reach S3 at http://u:****@127.0.0.1:1/b: refused"
    cut = one_line(f"{'x' * (MAX_MESSAGE_CHARS - 40)} http://u:{long_pw}@h")
    assert "VeryLong" not in cut and len(cut) <= MAX_MESSAGE_CHARS


def test_a_registered_secret_is_masked_before_the_message_is_cut() -> None:
    secret = "s" * 100 + "-registered-token"
    driverlog.redact(secret)
    exc = RemoteError(f"{'x' * (MAX_MESSAGE_CHARS - 50)} token {secret}")
    assert "sss" not in str(exc) and str(exc).endswith("token ****")


def test_an_action_failure_is_masked_before_the_mad_cuts_it() -> None:
    """The MAD keeps the end of a long failure (stock scripts' lines are not masked)."""
    from onemarket.mad.failures import Outcome

    outcome = Outcome(status=1, errors=[f"curl: cannot get http://u:{'p' * 1200}@h/x"])
    line = protocol.failure("IMPORT", 4, outcome.failure_text("import"))
    assert "ppp" not in line and "u:****@h/x" in line


# ------------------------------------------------------------------------ (d) repr()


def test_a_registered_secret_with_backslashes_is_masked_as_repr_shows_it() -> None:
    secret = "pa\\ss\\word1"
    driverlog.redact(secret)
    assert driverlog.scrub(f"key {secret!r} refused") == "key '****' refused"
    assert driverlog.scrub(f'{{"k": "{secret}"}}'.replace("\\", "\\\\")) == '{"k": "****"}'
    assert one_line(f"ENDPOINT {'ftp://u:' + secret + '@h/x'!r} invalid") == (
        "ENDPOINT 'ftp://u:****@h/x' invalid"
    )


def test_catalog_endpoint_with_a_backslash_password_is_masked() -> None:
    from onemarket.catalogs import linuxcontainers

    with pytest.raises(ValueError) as caught:
        linuxcontainers._endpoint("ftp://u:pa\\ss\\word1@127.0.0.1/x")
    assert "word1" not in one_line(str(caught.value))
    assert "word1" not in str(ConfigError(f"ENDPOINT {caught.value}"))


# ------------------------------------------------------------------------ (e) controls

CONTROLS = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)]


@pytest.mark.parametrize("ch", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_every_control_is_blanked_by_one_line_and_escaped_by_log_lines(
    ch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ch not in one_line(f"a{ch}b") and one_line(f"a{ch}b").startswith("a")
    out = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", out)
    driverlog.info(f"a{ch}b")
    line = out.getvalue()
    assert line.count("\n") == 1 and ch not in line.rstrip("\n") and line.startswith("INFO: a\\")


def test_a_csi_in_an_action_log_line_never_reaches_oned() -> None:
    """The MAD's LOG line for an action's stderr ``DEBUG: f<U+009B>31m`` (mad/driver.py's
    on_log: split_log_line, then protocol.log)."""
    parsed = protocol.split_log_line("DEBUG: f\x9b31m")
    assert parsed is not None
    assert protocol.log(7, *parsed) == "LOG D 7 f 31m\n"


def test_log_lines_mask_url_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", out)
    driverlog.warn(f"retrying http://alice:{PASSWORD}@127.0.0.1/x\nnext")
    assert out.getvalue() == "WARN: retrying http://alice:****@127.0.0.1/x\\nnext\n"
    target = io.StringIO()
    s = driverlog.ScrubbingStream(target)
    s.write(f"print http://alice:{PASSWORD}@h/\n")
    assert target.getvalue() == "print http://alice:****@h/\n"


def test_a_shortened_value_is_masked_before_it_is_cut() -> None:
    value = "http://u:" + "Long-Secret-Password-1" * 3 + "@h/x"
    assert "Long-Secret" not in shown(value) and shown(value).startswith("'http://u:****@h/x'")
