"""oned access through pyone: configuration like the OpenNebula CLI, host states, markets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from onemarket import driverlog, oneclient
from onemarket.errors import ConfigError, RemoteError

from tests.servers import free_port
from tests.servers.fake_oned import (
    FakeHost,
    FakeMarket,
    FakeOned,
    market_element,
    market_pool_element,
    to_text,
    use_one_auth,
    validate,
)

HTTP_MARKET = FakeMarket(
    id=100,
    name="Private http",
    market_mad="http",
    template={"BASE_URL": "http://127.0.0.1:8080/apps", "PUBLIC_DIR": "/srv/apps"},
    app_ids=[3, 4],
)
S3_MARKET = FakeMarket(
    id=101,
    name="Ceph",
    market_mad="s3",
    template={"BUCKET": "apps", "REGION": "default", "ACCESS_KEY_ID": "AK"},
)


def test_documents_validate_against_opennebula_xsd() -> None:
    validate(to_text(market_element(HTTP_MARKET)), "marketplace.xsd")
    validate(to_text(market_pool_element([HTTP_MARKET, S3_MARKET])), "marketplace_pool.xsd")
    validate(to_text(market_pool_element([])), "marketplace_pool.xsd")


def test_xsd_check_rejects_a_wrong_document() -> None:
    from lxml import etree

    bad = to_text(market_element(HTTP_MARKET)).replace("<STATE>0</STATE>", "")
    with pytest.raises(etree.DocumentInvalid):
        validate(bad, "marketplace.xsd")


def test_endpoint_and_auth_file_like_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".one").mkdir(parents=True)
    env = {"HOME": str(home)}
    assert oneclient.endpoint(env) == oneclient.DEFAULT_ENDPOINT
    assert oneclient.auth_file(env) == home / ".one" / "one_auth"
    (home / ".one" / "one_endpoint").write_text("http://front:2633/RPC2\n")
    assert oneclient.endpoint(env) == "http://front:2633/RPC2"
    env["ONE_XMLRPC"] = "http://other:2633/RPC2"
    assert oneclient.endpoint(env) == "http://other:2633/RPC2"
    assert oneclient.read_session(env) is None
    (home / ".one" / "one_auth").write_text("oneadmin:pw-from-home\n")
    assert oneclient.read_session(env) == "oneadmin:pw-from-home"
    env["ONE_AUTH"] = str(tmp_path / "missing")
    assert oneclient.read_session(env) is None
    assert oneclient.connect(environ=env) is None


@pytest.mark.parametrize("content", ["", "no-colon\n", ":nouser\n", "user:\n"])
def test_unusable_auth_file_means_no_oned(tmp_path: Path, content: str) -> None:
    path = tmp_path / "auth"
    path.write_text(content)
    assert oneclient.read_session({"ONE_AUTH": str(path)}) is None


def test_password_is_redacted(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    path.write_text("oneadmin:Very-Secret-Pw\n")
    oneclient.read_session({"ONE_AUTH": str(path)})
    assert "Very-Secret-Pw" not in driverlog.scrub("login oneadmin:Very-Secret-Pw failed")


def test_usable_hosts_skips_disabled_offline_error(fake_oned: FakeOned) -> None:
    fake_oned.hosts = [
        FakeHost(0, "ok", 2),
        FakeHost(1, "init", 0),
        FakeHost(2, "err", 3),
        FakeHost(3, "dis", 4),
        FakeHost(4, "monerr", 5),
        FakeHost(5, "mondis", 7),
        FakeHost(6, "off", 8),
    ]
    names = ["ok", "init", "err", "dis", "monerr", "mondis", "off", "storage-only"]
    assert oneclient.usable_hosts(names) == {"ok", "init", "storage-only"}
    assert fake_oned.calls == ["one.hostpool.info"]


def test_usable_hosts_none_without_oned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ONE_AUTH", raising=False)
    assert oneclient.usable_hosts(["a"]) is None
    use_one_auth(monkeypatch, tmp_path / "auth", "oneadmin:pw-unreachable")
    monkeypatch.setenv("ONE_XMLRPC", f"http://127.0.0.1:{free_port()}/RPC2")
    assert oneclient.usable_hosts(["a"]) is None


def test_usable_hosts_none_on_wrong_credentials(
    fake_oned: FakeOned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_one_auth(monkeypatch, tmp_path / "bad", "oneadmin:wrong-password")
    assert oneclient.usable_hosts(["a"]) is None


def test_usable_hosts_bounded_when_oned_hangs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A listener that accepts but never answers: None after the timeout, not a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        use_one_auth(monkeypatch, tmp_path / "auth", "oneadmin:pw-hang")
        monkeypatch.setenv("ONE_XMLRPC", f"http://127.0.0.1:{listener.getsockname()[1]}/RPC2")
        assert oneclient.usable_hosts(["a"], timeout_s=0.5) is None
    finally:
        listener.close()


def test_find_market_by_id_and_name(fake_oned: FakeOned) -> None:
    fake_oned.markets = [HTTP_MARKET, S3_MARKET]
    server = oneclient.connect()
    assert server is not None
    by_id = oneclient.find_market(server, "100")
    assert socket.getdefaulttimeout() is None  # pyone's timeout would set it process-wide
    assert (by_id.id, by_id.name, by_id.driver) == (100, "Private http", "http")
    assert by_id.attrs["PUBLIC_DIR"] == "/srv/apps"
    by_name = oneclient.find_market(server, "Ceph")
    assert (by_name.id, by_name.driver, by_name.attrs["BUCKET"]) == (101, "s3", "apps")


def test_find_market_errors(fake_oned: FakeOned) -> None:
    fake_oned.markets = [HTTP_MARKET, FakeMarket(7, "Private http", "http")]
    server = oneclient.connect()
    assert server is not None
    with pytest.raises(ConfigError, match="no marketplace with id 55"):
        oneclient.find_market(server, "55")
    with pytest.raises(ConfigError, match="no marketplace named 'nope'"):
        oneclient.find_market(server, "nope")
    with pytest.raises(ConfigError, match="several marketplaces"):
        oneclient.find_market(server, "Private http")


def test_find_market_wrong_credentials_hide_the_password(
    fake_oned: FakeOned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_one_auth(monkeypatch, tmp_path / "bad", "oneadmin:Wrong-Secret-99")
    server = oneclient.connect()
    assert server is not None
    with pytest.raises(RemoteError) as info:
        oneclient.find_market(server, "Ceph")
    assert "refused the credentials" in str(info.value)
    assert "Wrong-Secret-99" not in str(info.value)
