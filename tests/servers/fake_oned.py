"""A small oned simulator: an XML-RPC server on 127.0.0.1 answering the calls we make.

It answers like oned (``[success, body, error code]``; a body is an XML document for info
calls, an id for allocate calls): marketplaces and hosts are read; datastores read; images
allocated, read and deleted; apps allocated, read, listed and deleted. It checks the session
string and records every call. Documents are built with lxml from plain data, with the elements
and order of OpenNebula's schemas, so tests validate them against ``tests/data/xsd/oned.xsd``.

Asynchronous work is stepped by the info calls instead of a clock, so tests need no timing:
after ``one.image.allocate`` the image is LOCKED for the first ``one.image.info`` and READY
(its "copy" done) from the second (``image_copy_infos``); an app is LOCKED for its first
``one.marketapp.info`` and imported during the second, by ``FakeOned.importer`` (tests plug
in our real backend there, as oned's MAD would run it); ``one.marketapp.delete`` runs
``FakeOned.deleter`` and drops the app at the next info call, whatever the deleter said (oned
drops it on SUCCESS and FAILURE).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest
from lxml import etree
from onemarket.template import parse_template

from tests.servers import running, serve_in_thread, stop_serving

ONE_AUTHENTICATION = 0x0100
ONE_NO_EXISTS = 0x0400
ONE_ACTION = 0x0800
ONE_INTERNAL = 0x2000
ONE_ALLOCATE = 0x4000
XSD = Path(__file__).resolve().parent.parent / "data" / "xsd" / "oned.xsd"
ONE_NS = "http://opennebula.org/XMLSchema"
MIB = 1 << 20

IMAGE_READY, IMAGE_LOCKED, IMAGE_ERROR = 1, 4, 5
APP_READY, APP_LOCKED, APP_ERROR = 1, 2, 3
DS_IMAGE, DS_SYSTEM = 0, 1
PUBLIC_MADS = frozenset({"one", "linuxcontainers"})
"""Drivers whose MARKET_MAD_CONF allows no create (APP_ACTIONS = "monitor")."""


@dataclass
class FakeMarket:
    id: int
    name: str
    market_mad: str
    template: dict[str, str] = field(default_factory=dict)
    app_ids: list[int] = field(default_factory=list)
    state: int = 0


@dataclass
class FakeHost:
    id: int
    name: str
    state: int = 2


@dataclass
class FakeDatastore:
    id: int
    name: str
    type: int = DS_IMAGE
    state: int = 0
    ds_mad: str = "fs"
    tm_mad: str = "qcow2"
    free_mb: int = 100_000
    image_ids: list[int] = field(default_factory=list)


@dataclass
class FakeImage:
    id: int
    name: str
    path: str
    datastore: FakeDatastore
    size_mb: int
    format: str
    state: int = IMAGE_LOCKED
    infos: int = 0
    app_clones: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class FakeApp:
    id: int
    name: str
    market: FakeMarket
    origin_id: int
    state: int = APP_LOCKED
    source: str = ""
    md5: str = ""
    size_mb: int = 0
    format: str = ""
    infos: int = 0
    deleting: bool = False
    error: str = ""


Importer = Callable[[FakeImage, FakeApp], tuple[str, str, int, str]]
"""What the market driver does on IMPORT: (SOURCE, MD5, SIZE in MB, FORMAT), or raise."""
Deleter = Callable[[FakeApp], None]


def md5_importer(image: FakeImage, app: FakeApp) -> tuple[str, str, int, str]:
    """A stand-in driver: the image's MD5 and a made-up SOURCE."""
    digest = hashlib.md5(Path(image.path).read_bytes()).hexdigest()
    return f"fake://{app.market.name}/app-{app.id}", digest, image.size_mb, image.format


# ---------------------------------------------------------------------------- documents


def _sub(parent: etree._Element, tag: str, text: object = None) -> etree._Element:
    el = etree.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def _fields(parent: etree._Element, pairs: list[tuple[str, object]]) -> None:
    for tag, value in pairs:
        _sub(parent, tag, value)


def _owner(root: etree._Element, obj_id: int) -> None:
    _fields(root, [("ID", obj_id), ("UID", 0), ("GID", 0), ("UNAME", "oneadmin"),
                   ("GNAME", "oneadmin")])  # fmt: skip


def _ids(parent: etree._Element, tag: str, ids: list[int]) -> None:
    holder = _sub(parent, tag)
    for i in ids:
        _sub(holder, "ID", i)


def _permissions(parent: etree._Element) -> None:
    perms = _sub(parent, "PERMISSIONS")
    for who in ("OWNER", "GROUP", "OTHER"):
        for right, value in zip("UMA", (1, 1 if who == "OWNER" else 0, 0), strict=True):
            _sub(perms, f"{who}_{right}", value)


def _template(parent: etree._Element, attrs: dict[str, str]) -> None:
    tmpl = _sub(parent, "TEMPLATE")
    for name, value in attrs.items():
        _sub(tmpl, name, value)


def market_element(m: FakeMarket) -> etree._Element:
    """``<MARKETPLACE>`` as oned writes it (MarketPlace::to_xml order)."""
    root = etree.Element("MARKETPLACE")
    _owner(root, m.id)
    _fields(root, [("NAME", m.name), ("STATE", m.state), ("MARKET_MAD", m.market_mad),
                   ("ZONE_ID", 0), ("TOTAL_MB", 0), ("FREE_MB", 0), ("USED_MB", 0)])  # fmt: skip
    _ids(root, "MARKETPLACEAPPS", m.app_ids)
    _permissions(root)
    _template(root, {"MARKET_MAD": m.market_mad, **m.template})
    return root


def app_element(a: FakeApp) -> etree._Element:
    """``<MARKETPLACEAPP>`` (MarketPlaceApp::to_xml order; no LOCK: it is optional)."""
    root = etree.Element("MARKETPLACEAPP")
    _owner(root, a.id)
    _fields(root, [
        ("REGTIME", 1_700_000_000), ("NAME", a.name), ("ZONE_ID", 0), ("ORIGIN_ID", a.origin_id),
        ("SOURCE", a.source), ("MD5", a.md5), ("SIZE", a.size_mb), ("DESCRIPTION", ""),
        ("VERSION", "0.0"), ("FORMAT", a.format), ("APPTEMPLATE64", ""),
        ("MARKETPLACE_ID", a.market.id), ("MARKETPLACE", a.market.name), ("STATE", a.state),
        ("TYPE", 1),
    ])  # fmt: skip
    _permissions(root)
    _template(root, {"ERROR": a.error} if a.error else {})
    return root


def image_element(i: FakeImage) -> etree._Element:
    """``<IMAGE>`` with every element image.xsd requires, in its order."""
    root = etree.Element("IMAGE")
    _owner(root, i.id)
    _sub(root, "NAME", i.name)
    _permissions(root)
    _fields(root, [
        ("TYPE", 0), ("DISK_TYPE", 0), ("PERSISTENT", 0), ("REGTIME", 1_700_000_000),
        ("MODTIME", 1_700_000_000), ("SOURCE", f"/var/lib/one/datastores/{i.datastore.id}/{i.id}"),
        ("PATH", i.path), ("FORMAT", i.format), ("FS", ""), ("SIZE", i.size_mb),
        ("STATE", i.state), ("PREV_STATE", i.state), ("RUNNING_VMS", 0), ("CLONING_OPS", 0),
        ("CLONING_ID", -1), ("TARGET_SNAPSHOT", -1), ("DATASTORE_ID", i.datastore.id),
        ("DATASTORE", i.datastore.name),
    ])  # fmt: skip
    _ids(root, "VMS", [])
    _ids(root, "CLONES", [])
    _ids(root, "APP_CLONES", i.app_clones)
    _template(root, {"ERROR": i.error} if i.error else {})
    snapshots = _sub(root, "SNAPSHOTS")
    _fields(snapshots, [("ALLOW_ORPHANS", "NO"), ("CURRENT_BASE", -1), ("NEXT_SNAPSHOT", 0)])
    _sub(root, "BACKUP_INCREMENTS")
    return root


def datastore_element(d: FakeDatastore) -> etree._Element:
    """``<DATASTORE>`` (datastore.xsd order)."""
    root = etree.Element("DATASTORE")
    _owner(root, d.id)
    _sub(root, "NAME", d.name)
    _permissions(root)
    _fields(root, [("DS_MAD", d.ds_mad), ("TM_MAD", d.tm_mad),
                   ("BASE_PATH", f"/var/lib/one/datastores/{d.id}"), ("TYPE", d.type),
                   ("DISK_TYPE", 0), ("STATE", d.state)])  # fmt: skip
    _ids(root, "CLUSTERS", [0])
    _fields(root, [("TOTAL_MB", d.free_mb * 2), ("FREE_MB", d.free_mb), ("USED_MB", d.free_mb)])
    _ids(root, "IMAGES", d.image_ids)
    _template(root, {"DS_MAD": d.ds_mad, "TM_MAD": d.tm_mad})
    return root


def pool_element(tag: str, items: list[etree._Element]) -> etree._Element:
    root = etree.Element(tag)
    root.extend(items)
    return root


def market_pool_element(markets: list[FakeMarket]) -> etree._Element:
    return pool_element("MARKETPLACE_POOL", [market_element(m) for m in markets])


def host_pool_element(hosts: list[FakeHost]) -> etree._Element:
    """``<HOST_POOL>`` with the identity and state of each host (what we read of it; the
    rest of a HOST is not modelled, so host documents are not validated)."""
    root = etree.Element("HOST_POOL")
    for h in hosts:
        host = _sub(root, "HOST")
        _fields(host, [("ID", h.id), ("NAME", h.name), ("STATE", h.state),
                       ("PREV_STATE", h.state), ("IM_MAD", "kvm"), ("VM_MAD", "kvm"),
                       ("CLUSTER_ID", 0), ("CLUSTER", "default")])  # fmt: skip
        _sub(host, "TEMPLATE")
    return root


def to_text(el: etree._Element) -> str:
    return etree.tostring(el, encoding="unicode")


_schema: etree.XMLSchema | None = None


def validate(document: str) -> None:
    """Validate an oned document against ``tests/data/xsd/oned.xsd`` (every element put in
    oned's namespace first, as upstream's ``share/doc/xsd/test.sh`` does).

    Raises ``lxml.etree.DocumentInvalid`` with the schema's message when it does not validate.
    """
    global _schema
    if _schema is None:
        _schema = etree.XMLSchema(etree.parse(str(XSD)))
    doc = etree.fromstring(document.encode("utf-8"))
    for el in doc.iter():
        if isinstance(el.tag, str) and not el.tag.startswith("{"):
            el.tag = f"{{{ONE_NS}}}{el.tag}"
    _schema.assertValid(doc)


# ---------------------------------------------------------------------------- server


class _Quiet(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, *args: object) -> None:
        pass


class _Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


_T = TypeVar("_T")


def _existing(found: _T | None, what: str, wanted: int) -> _T:
    """``found``, or oned's answer for an object id that does not exist."""
    if found is None:
        raise _Failure(f"Error getting {what} [{wanted}].", ONE_NO_EXISTS)
    return found


@dataclass
class FakeOned:
    session: str = "oneadmin:Secr3t-pass"
    markets: list[FakeMarket] = field(default_factory=list)
    hosts: list[FakeHost] = field(default_factory=list)
    datastores: list[FakeDatastore] = field(default_factory=list)
    images: dict[int, FakeImage] = field(default_factory=dict)
    apps: dict[int, FakeApp] = field(default_factory=dict)
    importer: Importer = md5_importer
    deleter: Deleter | None = None
    image_copy_fails: str = ""
    """When set, the datastore "copy" of every new image fails with this message."""
    image_copy_infos: int = 2
    """The info call at which a new image's copy is done (LOCKED before)."""
    unreadable_paths: set[str] = field(default_factory=set)
    """Image PATHs oned's host cannot read (as when one-market runs on another machine)."""
    on_call: Callable[[str], None] | None = None
    """Called with each method's name as it is received (a test sends a signal from it)."""
    calls: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    """Every XML document answered, in order (tests validate them against the XSD)."""
    next_id: int = 0

    def start(self) -> None:
        self.lock = threading.Lock()
        self.server = SimpleXMLRPCServer(
            ("127.0.0.1", 0), requestHandler=_Quiet, logRequests=False, allow_none=True
        )
        for name in (
            "market.info",
            "marketpool.info",
            "hostpool.info",
            "datastore.info",
            "datastorepool.info",
            "image.allocate",
            "image.info",
            "image.delete",
            "marketapp.allocate",
            "marketapp.info",
            "marketapp.delete",
            "marketapppool.info",
        ):
            method = getattr(self, "_" + name.replace(".", "_"))
            self.server.register_function(self._wrap(f"one.{name}", method), f"one.{name}")
        self.port = self.server.server_address[1]
        self.thread = serve_in_thread(self.server)

    def stop(self) -> None:
        stop_serving(self.server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    def _wrap(self, method: str, handler: Callable[..., object]) -> Callable[..., list]:
        def call(session: str, *args: object) -> list:
            with self.lock:
                self.calls.append(method)
                if self.on_call is not None:
                    self.on_call(method)
                if session != self.session:
                    message = f"[{method}] User couldn't be authenticated, aborting call."
                    return [False, message, ONE_AUTHENTICATION]
                try:
                    result = handler(*args)
                except _Failure as exc:
                    return [False, f"[{method}] {exc}", exc.code]
                if isinstance(result, etree._Element):
                    document = to_text(result)
                    self.answers.append(document)
                    return [True, document, 0]
                return [True, result, 0]

        return call

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # -- markets, hosts, datastores

    def _market(self, market_id: int) -> FakeMarket:
        found = next((m for m in self.markets if m.id == market_id), None)
        return _existing(found, "marketplace", market_id)

    def _market_info(self, market_id: int, *_: object) -> etree._Element:
        return market_element(self._market(market_id))

    def _marketpool_info(self, *_: object) -> etree._Element:
        return market_pool_element(self.markets)

    def _hostpool_info(self, *_: object) -> etree._Element:
        return host_pool_element(self.hosts)

    def _datastore(self, ds_id: int) -> FakeDatastore:
        return _existing(
            next((d for d in self.datastores if d.id == ds_id), None), "datastore", ds_id
        )

    def _datastore_info(self, ds_id: int, *_: object) -> etree._Element:
        return datastore_element(self._datastore(ds_id))

    def _datastorepool_info(self, *_: object) -> etree._Element:
        return pool_element("DATASTORE_POOL", [datastore_element(d) for d in self.datastores])

    # -- images

    def _image_allocate(self, template: str, ds_id: int, *_: object) -> int:
        attrs = parse_template(template).as_dict()
        ds = self._datastore(ds_id)
        if ds.type not in (DS_IMAGE, 2):
            message = "New images can only be allocated in a files or image datastore."
            raise _Failure(f"Error allocating a new image. {message}", ONE_ALLOCATE)
        name, path = attrs.get("NAME", ""), attrs.get("PATH", "")
        taken = [i.id for i in self.images.values() if i.name == name]
        if taken:
            raise _Failure(f"NAME is already taken by IMAGE {taken[0]}.", ONE_ALLOCATE)
        try:  # oned's stat action: the datastore driver sizes the file before allocating
            if path in self.unreadable_paths:
                raise FileNotFoundError(2, "No such file or directory")
            size = os.stat(path).st_size
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError as exc:
            raise _Failure(f"Cannot parse image SIZE: {exc.strerror}", ONE_INTERNAL) from None
        image = FakeImage(
            id=self._new_id(),
            name=name,
            path=path,
            datastore=ds,
            size_mb=max(1, math.ceil(size / MIB)),
            format="qcow2" if head == b"QFI\xfb" else "raw",
        )
        self.images[image.id] = image
        ds.image_ids.append(image.id)
        return image.id

    def _image(self, image_id: int) -> FakeImage:
        return _existing(self.images.get(image_id), "image", image_id)

    def _image_info(self, image_id: int, *_: object) -> etree._Element:
        image = self._image(image_id)
        image.infos += 1
        done = image.infos == self.image_copy_infos
        if done and image.state == IMAGE_LOCKED and not image.app_clones:
            if self.image_copy_fails:
                image.state, image.error = IMAGE_ERROR, self.image_copy_fails
            else:
                image.state = IMAGE_READY
        return image_element(image)

    def _image_delete(self, image_id: int, force: bool = False, *_: object) -> int:
        image = self._image(image_id)
        if image.state == IMAGE_LOCKED and not force:
            raise _Failure(
                "Image locked, use --force flag to remove the image. "
                "Force delete may leave some files on Datastore",
                ONE_INTERNAL,
            )
        del self.images[image_id]
        image.datastore.image_ids.remove(image_id)
        return image_id

    # -- apps

    def _marketapp_allocate(self, template: str, market_id: int, *_: object) -> int:
        attrs = parse_template(template).as_dict()
        market = self._market(market_id)
        if market.market_mad in PUBLIC_MADS:
            raise _Failure(f"Create disabled for market: {market.name}", ONE_ACTION)
        if "ORIGIN_ID" not in attrs:
            raise _Failure("Missing ORIGIN_ID for the MARKETPLACEAPP", ONE_ALLOCATE)
        name = attrs.get("NAME", "")
        taken = [a.id for a in self.apps.values() if a.name == name and a.market is market]
        if taken:
            raise _Failure(f"NAME is already taken by MARKETPLACEAPP {taken[0]}.", ONE_ALLOCATE)
        app = FakeApp(id=self._new_id(), name=name, market=market,
                      origin_id=int(attrs["ORIGIN_ID"]))  # fmt: skip
        self.apps[app.id] = app
        market.app_ids.append(app.id)
        image = self.images.get(app.origin_id)
        if image is None or image.state != IMAGE_READY:
            app.state, app.error = APP_ERROR, "Image does not exist or is not READY."
        else:
            image.state = IMAGE_LOCKED  # oned's set_app_clone_state
            image.app_clones.append(app.id)
        return app.id

    def _app(self, app_id: int) -> FakeApp:
        return _existing(self.apps.get(app_id), "marketplace app", app_id)

    def _drop(self, app: FakeApp) -> None:
        del self.apps[app.id]
        app.market.app_ids.remove(app.id)

    def _marketapp_info(self, app_id: int, *_: object) -> etree._Element:
        app = self._app(app_id)
        if app.deleting:
            self._drop(app)
            raise _Failure(f"Error getting marketplace app [{app_id}].", ONE_NO_EXISTS)
        app.infos += 1
        if app.infos == 2 and app.state == APP_LOCKED:
            self._import(app)
        return app_element(app)

    def _import(self, app: FakeApp) -> None:
        image = self.images[app.origin_id]
        try:
            app.source, app.md5, app.size_mb, app.format = self.importer(image, app)
            app.state = APP_READY
        except Exception as exc:  # noqa: BLE001 - the driver's failure, as oned records it
            app.state = APP_ERROR
            app.error = f"Error importing app into marketplace: {exc}"
        finally:  # oned's release_app_resources
            image.app_clones.remove(app.id)
            if not image.app_clones:
                image.state = IMAGE_READY

    def _marketapp_delete(self, app_id: int, *_: object) -> int:
        app = self._app(app_id)
        if self.deleter is not None and app.source:
            with contextlib.suppress(Exception):  # oned drops the app on FAILURE too
                self.deleter(app)
        app.deleting = True
        return app_id

    def _marketapppool_info(self, *_: object) -> etree._Element:
        apps = [app_element(a) for a in self.apps.values() if not a.deleting]
        return pool_element("MARKETPLACEAPP_POOL", apps)


def use_one_auth(monkeypatch: pytest.MonkeyPatch, path: Path, session: str) -> None:
    """Write ``session`` (``user:password``) to ``path``, mode 600 like the CLI's one_auth,
    and point ONE_AUTH at it for this test."""
    path.write_text(session + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("ONE_AUTH", str(path))


@pytest.fixture
def fake_oned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOned]:
    """A running fake oned, with ONE_XMLRPC and ONE_AUTH pointing at it for this test."""
    with running(FakeOned()) as server:
        monkeypatch.setenv("ONE_XMLRPC", server.url)
        use_one_auth(monkeypatch, tmp_path / "one_auth", server.session)
        yield server
