"""oned access through pyone: configuration like the OpenNebula CLI, host states, markets."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from onemarket import driverlog, oneclient
from onemarket.errors import ConfigError, RemoteError

from tests.servers import free_port
from tests.servers.fake_oned import (
    FakeApp,
    FakeDatastore,
    FakeHost,
    FakeImage,
    FakeMarket,
    FakeOned,
    app_element,
    datastore_element,
    image_element,
    market_element,
    market_pool_element,
    pool_element,
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


DATASTORE = FakeDatastore(1, "default")
IMAGE = FakeImage(5, "disk", "/srv/disk.qcow2", DATASTORE, 12, "qcow2", app_clones=[6])
APP = FakeApp(6, "Debian", FakeMarket(100, "Private http", "http"), 5, error="boom")


def test_documents_validate_against_the_oned_schema() -> None:
    for element in (
        market_element(HTTP_MARKET),
        market_pool_element([HTTP_MARKET, S3_MARKET]),
        market_pool_element([]),
        app_element(APP),
        pool_element("MARKETPLACEAPP_POOL", [app_element(APP)]),
        image_element(IMAGE),
        datastore_element(DATASTORE),
        pool_element("DATASTORE_POOL", []),
    ):
        validate(to_text(element))


@pytest.mark.parametrize(
    ("element", "edit"),
    [
        (market_element(HTTP_MARKET), ("<STATE>0</STATE>", "")),  # a required element missing
        (market_element(HTTP_MARKET), ("<ZONE_ID>0</ZONE_ID>", "<ZONE_ID>0</ZONE_ID><X/>")),
        (app_element(APP), ("<SIZE>0</SIZE>", "<SIZE>big</SIZE>")),  # an integer
        (image_element(IMAGE), ("<BACKUP_INCREMENTS/>", "")),
        (datastore_element(DATASTORE), ("<TYPE>0</TYPE><DISK_TYPE>0</DISK_TYPE>",
                                        "<DISK_TYPE>0</DISK_TYPE><TYPE>0</TYPE>")),  # order
    ],
)  # fmt: skip
def test_schema_rejects_a_wrong_document(element, edit: tuple[str, str]) -> None:
    from lxml import etree

    text = to_text(element)
    assert edit[0] in text
    with pytest.raises(etree.DocumentInvalid):
        validate(text.replace(*edit, 1))


def test_schema_takes_an_optional_lock_with_only_its_level() -> None:
    text = to_text(app_element(APP))
    locked = text.replace("<REGTIME>", "<LOCK><LOCKED>1</LOCKED></LOCK><REGTIME>", 1)
    validate(locked)


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


def test_connection_failure_names_the_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}/RPC2"
    use_one_auth(monkeypatch, tmp_path / "auth", "oneadmin:pw-endpoint")
    monkeypatch.setenv("ONE_XMLRPC", url)
    server = oneclient.connect()
    assert server is not None
    with pytest.raises(RemoteError) as info:
        oneclient.find_market(server, "7")
    assert f"cannot connect to oned at {url} (ONE_XMLRPC)" in str(info.value)
    with pytest.raises(RemoteError) as info:  # the same lookup for every kind
        oneclient.find_datastore(server, "default")
    assert str(info.value).startswith("cannot read datastore 'default' from oned: cannot connect")


def test_a_malformed_endpoint_is_a_config_error_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_one_auth(monkeypatch, tmp_path / "auth", "oneadmin:pw-malformed")
    monkeypatch.setenv("ONE_XMLRPC", "http://u:Rpc-Secret-7@[::1/RPC2")
    with pytest.raises(ConfigError, match=r"ONE_XMLRPC is not a valid URL \(unbalanced") as info:
        oneclient.connect()
    assert "Rpc-Secret-7" not in str(info.value)
    monkeypatch.setenv("ONE_XMLRPC", "http://127.0.0.1:99999/RPC2")
    with pytest.raises(ConfigError, match="its port is not a number"):
        oneclient.connect()


def test_market_state(fake_oned: FakeOned) -> None:
    fake_oned.markets = [FakeMarket(3, "off", "http", app_ids=[1, 2], state=1), HTTP_MARKET]
    server = oneclient.connect()
    off = oneclient.find_market(server, "3")
    assert isinstance(off, oneclient.OnedMarket)
    assert off.disabled
    assert not oneclient.find_market(server, "Private http").disabled


def test_find_datastore(fake_oned: FakeOned) -> None:
    fake_oned.datastores = [
        FakeDatastore(0, "system", type=1),
        FakeDatastore(1, "default"),
        FakeDatastore(2, "off", state=1),
        FakeDatastore(3, "twin"),
        FakeDatastore(4, "twin"),
    ]
    server = oneclient.connect()
    assert oneclient.find_datastore(server, "1").name == "default"
    assert oneclient.find_datastore(server, "default").id == 1
    for ref, words in [
        ("0", "is a SYSTEM datastore"),
        ("off", "is disabled"),
        ("twin", "several datastores"),
        ("9", "no datastore with id 9"),
        ("nope", "no datastore named 'nope'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            oneclient.find_datastore(server, ref)
    for document in fake_oned.answers:
        validate(document)


def test_image_and_app_life_cycle(fake_oned: FakeOned, tmp_path: Path) -> None:
    """allocate, LOCKED, READY, delete, for an image and an app made from it."""
    fake_oned.datastores = [FakeDatastore(1, "default")]
    fake_oned.markets = [FakeMarket(100, "Private http", "http")]
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 3000)
    server = oneclient.connect()
    image_id = oneclient.allocate_image(server, f'NAME="d"\nPATH="{disk}"\n', 1)
    states = [oneclient.image_info(server, image_id).state for _ in range(2)]
    assert states == [oneclient.IMAGE_STATE_LOCKED, oneclient.IMAGE_STATE_READY]
    app_id = oneclient.allocate_app(server, f'NAME="a"\nORIGIN_ID="{image_id}"\n', 100)
    first, second = (oneclient.app_info(server, app_id) for _ in range(2))
    assert (first.state_name, second.state_name) == ("LOCKED", "READY")
    assert second.md5 == hashlib.md5(disk.read_bytes()).hexdigest()
    assert (second.size_mb, second.market_id) == (1, 100)
    assert [a.id for a in oneclient.apps_with_source(server, second.source)] == [app_id]
    assert oneclient.apps_with_source(server, "http://elsewhere/x") == []
    oneclient.delete_app(server, app_id)
    assert oneclient.app_info(server, app_id) is None
    oneclient.delete_image(server, image_id)
    assert oneclient.image_info(server, image_id) is None
    oneclient.delete_image(server, image_id)  # gone already: not an error
    for document in fake_oned.answers:
        validate(document)


def test_oned_refusals_are_one_line(fake_oned: FakeOned, tmp_path: Path) -> None:
    fake_oned.datastores = [FakeDatastore(1, "default")]
    fake_oned.markets = [FakeMarket(0, "public", "one")]
    server = oneclient.connect()
    with pytest.raises(RemoteError, match=r"creating an image in datastore 1: .*SIZE"):
        oneclient.allocate_image(server, f'NAME="d"\nPATH="{tmp_path / "absent"}"\n', 1)
    with pytest.raises(RemoteError, match="Create disabled for market: public"):
        oneclient.allocate_app(server, 'NAME="a"\nORIGIN_ID="1"\n', 0)
