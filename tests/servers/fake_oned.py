"""A small oned simulator: an XML-RPC server on 127.0.0.1 answering the calls we make.

It answers ``one.market.info``, ``one.marketpool.info`` and ``one.hostpool.info`` the way
oned does (``[success, body, error code]``, body an XML document for successes), checks the
session string, and records every call. Documents are built with lxml from plain data so
that the tests can validate them against OpenNebula's XSD (``tests/data/xsd``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest
from lxml import etree

from tests.servers import serve_in_thread, stop_serving

ONE_AUTHENTICATION = 0x0100
ONE_NO_EXISTS = 0x0400
XSD_DIR = Path(__file__).resolve().parent.parent / "data" / "xsd"
ONE_NS = "http://opennebula.org/XMLSchema"


@dataclass
class FakeMarket:
    id: int
    name: str
    market_mad: str
    template: dict[str, str] = field(default_factory=dict)
    app_ids: list[int] = field(default_factory=list)


@dataclass
class FakeHost:
    id: int
    name: str
    state: int = 2


def _sub(parent: etree._Element, tag: str, text: object) -> etree._Element:
    el = etree.SubElement(parent, tag)
    el.text = str(text)
    return el


def market_element(m: FakeMarket) -> etree._Element:
    """``<MARKETPLACE>`` as oned writes it (element order of marketplace.xsd)."""
    root = etree.Element("MARKETPLACE")
    for tag, value in (
        ("ID", m.id),
        ("UID", 0),
        ("GID", 0),
        ("UNAME", "oneadmin"),
        ("GNAME", "oneadmin"),
        ("NAME", m.name),
        ("STATE", 0),
        ("MARKET_MAD", m.market_mad),
        ("ZONE_ID", 0),
        ("TOTAL_MB", 0),
        ("FREE_MB", 0),
        ("USED_MB", 0),
    ):
        _sub(root, tag, value)
    apps = etree.SubElement(root, "MARKETPLACEAPPS")
    for app_id in m.app_ids:
        _sub(apps, "ID", app_id)
    perms = etree.SubElement(root, "PERMISSIONS")
    for tag, value in (
        ("OWNER_U", 1),
        ("OWNER_M", 1),
        ("OWNER_A", 1),
        ("GROUP_U", 1),
        ("GROUP_M", 0),
        ("GROUP_A", 0),
        ("OTHER_U", 1),
        ("OTHER_M", 0),
        ("OTHER_A", 0),
    ):
        _sub(perms, tag, value)
    tmpl = etree.SubElement(root, "TEMPLATE")
    for name, value in {"MARKET_MAD": m.market_mad, **m.template}.items():
        _sub(tmpl, name, value)
    return root


def market_pool_element(markets: list[FakeMarket]) -> etree._Element:
    root = etree.Element("MARKETPLACE_POOL")
    for m in markets:
        root.append(market_element(m))
    return root


def host_pool_element(hosts: list[FakeHost]) -> etree._Element:
    """``<HOST_POOL>`` with the identity and state of each host (what we read of it)."""
    root = etree.Element("HOST_POOL")
    for h in hosts:
        host = etree.SubElement(root, "HOST")
        _sub(host, "ID", h.id)
        _sub(host, "NAME", h.name)
        _sub(host, "STATE", h.state)
        _sub(host, "PREV_STATE", h.state)
        _sub(host, "IM_MAD", "kvm")
        _sub(host, "VM_MAD", "kvm")
        _sub(host, "CLUSTER_ID", 0)
        _sub(host, "CLUSTER", "default")
        etree.SubElement(host, "TEMPLATE")
    return root


def to_text(el: etree._Element) -> str:
    return etree.tostring(el, encoding="unicode")


def validate(document: str, schema_file: str) -> None:
    """Validate an oned document against an XSD of tests/data/xsd (root put in oned's namespace).

    Raises ``lxml.etree.DocumentInvalid`` with the schema's message when it does not validate.
    """
    doc = etree.fromstring(document.encode("utf-8"))
    for el in doc.iter():
        if isinstance(el.tag, str) and not el.tag.startswith("{"):
            el.tag = f"{{{ONE_NS}}}{el.tag}"
    schema = etree.XMLSchema(etree.parse(str(XSD_DIR / schema_file)))
    schema.assertValid(doc)


class _Quiet(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class FakeOned:
    session: str = "oneadmin:Secr3t-pass"
    markets: list[FakeMarket] = field(default_factory=list)
    hosts: list[FakeHost] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    """Every XML document answered, in order (tests validate them against the XSD)."""

    def start(self) -> None:
        self.server = SimpleXMLRPCServer(
            ("127.0.0.1", 0), requestHandler=_Quiet, logRequests=False, allow_none=True
        )
        self.server.register_function(self._market_info, "one.market.info")
        self.server.register_function(self._marketpool_info, "one.marketpool.info")
        self.server.register_function(self._hostpool_info, "one.hostpool.info")
        self.port = self.server.server_address[1]
        self.thread = serve_in_thread(self.server)

    def stop(self) -> None:
        stop_serving(self.server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    def _auth(self, method: str, session: str) -> list | None:
        self.calls.append(method)
        if session != self.session:
            message = f"[{method}] User couldn't be authenticated, aborting call."
            return [False, message, ONE_AUTHENTICATION]
        return None

    def _market_info(self, session: str, market_id: int, *_: object) -> list:
        denied = self._auth("one.market.info", session)
        if denied:
            return denied
        for m in self.markets:
            if m.id == market_id:
                return self._ok(to_text(market_element(m)))
        return [False, f"[one.market.info] Error getting marketplace [{market_id}].", ONE_NO_EXISTS]

    def _marketpool_info(self, session: str, *_: object) -> list:
        denied = self._auth("one.marketpool.info", session)
        return denied or self._ok(to_text(market_pool_element(self.markets)))

    def _hostpool_info(self, session: str, *_: object) -> list:
        denied = self._auth("one.hostpool.info", session)
        return denied or self._ok(to_text(host_pool_element(self.hosts)))

    def _ok(self, document: str) -> list:
        self.answers.append(document)
        return [True, document, 0]


def use_one_auth(monkeypatch: pytest.MonkeyPatch, path: Path, session: str) -> None:
    """Write ``session`` (``user:password``) to ``path``, mode 600 like the CLI's one_auth,
    and point ONE_AUTH at it for this test."""
    path.write_text(session + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("ONE_AUTH", str(path))


@pytest.fixture
def fake_oned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOned]:
    """A running fake oned, with ONE_XMLRPC and ONE_AUTH pointing at it for this test."""
    server = FakeOned()
    server.start()
    monkeypatch.setenv("ONE_XMLRPC", server.url)
    use_one_auth(monkeypatch, tmp_path / "one_auth", server.session)
    try:
        yield server
    finally:
        server.stop()
