"""A pyone client for oned, configured the way the OpenNebula CLI configures itself.

Endpoint: ``ONE_XMLRPC``, else ``~/.one/one_endpoint``, else ``http://localhost:2633/RPC2``.
Credentials: the first line (``user:password``) of the file named by ``ONE_AUTH``, else of
``~/.one/one_auth``. The MAD runs as oneadmin, whose home holds that file, so drivers find
oned without extra configuration; on a machine without it :func:`connect` returns ``None``
at once and callers carry on without oned.

pyone's own ``timeout`` sets the process-wide socket default (it would slow down every other
socket of an import), and its transport posts without a timeout. The client returned here
uses a transport with its own bounded connect and read timeouts instead. The password is
registered with :func:`driverlog.redact` and never appears in a message of this module.

Besides reading markets and host states, it makes the calls ``one-market`` needs to work
through oned as an administrator would with ``oneimage`` and ``onemarketapp``: allocate, read and
delete images and apps (``one.image.*``, ``one.marketapp.*``), find datastores and the apps of a
SOURCE. Each answer becomes a small typed record; each failure one :class:`RemoteError` or
:class:`ConfigError` line naming the object and, for a connection failure, the endpoint.
"""

from __future__ import annotations

import os
import xmlrpc.client
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyone
import requests

from . import driverlog
from .action import Market
from .errors import ConfigError, RemoteError, one_line
from .location import split_url

DEFAULT_ENDPOINT = "http://localhost:2633/RPC2"
USER_AGENT = "onemarket"
CONNECT_TIMEOUT_S = 3.0
"""Default bound on every XML-RPC call (connect and each read) of :func:`connect`."""
HOSTS_TIMEOUT_S = 3.0
"""Bound on the host pool query of :func:`usable_hosts`; an import never waits longer on oned."""
MAX_AUTH_FILE_BYTES = 64 * 1024
"""Largest ONE_AUTH file read (a ``user:password`` line; bounds memory on a wrong path)."""

HOST_STATE_ERROR = 3
HOST_STATE_DISABLED = 4
HOST_STATE_MONITORING_ERROR = 5
HOST_STATE_MONITORING_DISABLED = 7
HOST_STATE_OFFLINE = 8
UNUSABLE_HOST_STATES = frozenset(
    {
        HOST_STATE_ERROR,
        HOST_STATE_DISABLED,
        HOST_STATE_MONITORING_ERROR,
        HOST_STATE_MONITORING_DISABLED,
        HOST_STATE_OFFLINE,
    }
)
"""oned host states (``one.hostpool.info`` STATE) in which a bridge host must not be used."""

MARKET_STATE_ENABLED = 0
MARKET_STATE_DISABLED = 1
"""``MARKETPLACE/STATE`` (``onemarket enable/disable``); oned does not monitor a disabled one."""

IMAGE_STATE_READY = 1
IMAGE_STATE_LOCKED = 4
IMAGE_STATE_ERROR = 5
IMAGE_STATE_NAMES = {
    0: "INIT",
    1: "READY",
    2: "USED",
    3: "DISABLED",
    4: "LOCKED",
    5: "ERROR",
    6: "CLONE",
    7: "DELETE",
    8: "USED_PERS",
    9: "LOCKED_USED",
    10: "LOCKED_USED_PERS",
}
"""``IMAGE/STATE`` values (image.xsd); LOCKED while the datastore driver copies the file."""

APP_STATE_READY = 1
APP_STATE_LOCKED = 2
APP_STATE_ERROR = 3
APP_STATE_NAMES = {0: "INIT", 1: "READY", 2: "LOCKED", 3: "ERROR", 4: "DISABLED"}
"""``MARKETPLACEAPP/STATE`` values; LOCKED while the market driver imports the image."""

DATASTORE_TYPE_IMAGE = 0
DATASTORE_TYPE_NAMES = {0: "IMAGE", 1: "SYSTEM", 2: "FILE", 3: "BACKUP"}
DATASTORE_STATE_DISABLED = 1

POOL_ALL = -2
"""``filter_flag`` of the pool info calls: every object the user may see."""


class _TimeoutTransport(xmlrpc.client.Transport):
    """XML-RPC over requests, with connect/read timeouts on every call."""

    def __init__(self, timeout_s: float, https: bool) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.scheme = "https" if https else "http"

    def request(self, host, handler, request_body, verbose=False):  # type: ignore[override]
        url = f"{self.scheme}://{host}/{handler.lstrip('/')}"
        resp = requests.post(
            url,
            data=request_body,
            headers={"Content-Type": "text/xml", "User-Agent": USER_AGENT},
            timeout=(self.timeout_s, self.timeout_s),
        )
        if resp.status_code >= 400:
            raise xmlrpc.client.ProtocolError(url, resp.status_code, resp.reason, resp.headers)
        parser, unmarshaller = self.getparser()
        parser.feed(resp.content)
        parser.close()
        return unmarshaller.close()


def endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The XML-RPC endpoint the OpenNebula CLI would use."""
    env = os.environ if environ is None else environ
    value = env.get("ONE_XMLRPC", "").strip()
    if value:
        return value
    home = Path(env["HOME"]) if env.get("HOME") else None
    if home is not None:
        try:
            text = (home / ".one" / "one_endpoint").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text:
            return text.splitlines()[0].strip()
    return DEFAULT_ENDPOINT


def auth_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """The credentials file the OpenNebula CLI would read (``ONE_AUTH`` or ``~/.one/one_auth``)."""
    env = os.environ if environ is None else environ
    value = env.get("ONE_AUTH", "").strip()
    if value:
        return Path(value).expanduser()
    home = Path(env["HOME"]) if env.get("HOME") else None
    return home / ".one" / "one_auth" if home is not None else None


def read_session(environ: Mapping[str, str] | None = None) -> str | None:
    """``user:password`` from the credentials file, or None when there is none usable."""
    path = auth_file(environ)
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_AUTH_FILE_BYTES)
    except OSError:
        return None
    lines = raw.decode("utf-8", "replace").strip().splitlines()
    session = lines[0].strip() if lines else ""
    user, sep, password = session.partition(":")
    if not sep or not user or not password:
        return None
    driverlog.redact(password)
    return session


def connect(
    timeout_s: float = CONNECT_TIMEOUT_S, environ: Mapping[str, str] | None = None
) -> xmlrpc.client.ServerProxy | None:
    """A pyone client for oned, or None when no credentials are configured.

    Nothing is sent here: an unreachable oned shows up on the first call, bounded by
    ``timeout_s``.
    """
    session = read_session(environ)
    if session is None:
        return None
    uri = endpoint(environ)
    if not uri.startswith(("http://", "https://")):
        return None
    split_url(uri, "ONE_XMLRPC")
    # timeout=None: pyone would otherwise set the process-wide socket default timeout
    server = pyone.OneServer(uri, session=session, timeout=None)
    if not isinstance(server, xmlrpc.client.ServerProxy):
        return None  # ONEAPI_PROTOCOL asked for gRPC, which this client does not speak
    # ServerProxy keeps its transport in a private attribute; swap in the bounded one.
    server._ServerProxy__transport = _TimeoutTransport(timeout_s, uri.startswith("https"))  # type: ignore[attr-defined]
    return server


def _url_of(exc: BaseException) -> str:
    """The endpoint a failed requests call was sent to (password masked), or ONE_XMLRPC's."""
    request = getattr(exc, "request", None)
    url = str(getattr(request, "url", "") or getattr(exc, "url", "") or "") or endpoint()
    driverlog.redact_url(url)
    return driverlog.scrub(url)


def describe_failure(exc: BaseException) -> str:
    """One line about a failed oned call, without the session string; a connection failure
    names the endpoint tried, so a wrong ONE_XMLRPC shows at once."""
    if isinstance(exc, pyone.OneAuthenticationException):
        return "oned refused the credentials of ONE_AUTH"
    if isinstance(exc, pyone.OneAuthorizationException):
        return "oned denied the request to the user of ONE_AUTH"
    if isinstance(exc, requests.Timeout):
        return f"oned did not answer in time at {_url_of(exc)} (ONE_XMLRPC)"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to oned at {_url_of(exc)} (ONE_XMLRPC)"
    if isinstance(exc, xmlrpc.client.ProtocolError):
        return f"oned answered HTTP {exc.errcode} at {_url_of(exc)}"
    text = one_line(driverlog.scrub(str(exc)), 300)
    return f"oned call failed: {text or type(exc).__name__}"


def _template_attrs(template: object) -> dict[str, str]:
    """Single-valued attributes of a pyone TEMPLATE (an ordered dict; vectors left out)."""
    if not isinstance(template, Mapping):
        return {}
    return {str(k): v.strip() for k, v in template.items() if isinstance(v, str)}


def _int(obj: object, name: str, default: int = -1) -> int:
    try:
        return int(getattr(obj, name))
    except (TypeError, ValueError):
        return default


def _str(obj: object, name: str) -> str:
    value = getattr(obj, name, None)
    return "" if value is None else str(value)


@dataclass(frozen=True)
class OnedMarket(Market):
    """A marketplace read from oned: the driver's view plus what only oned knows."""

    state: int = MARKET_STATE_ENABLED

    @property
    def disabled(self) -> bool:
        return self.state == MARKET_STATE_DISABLED


def market_from_pyone(obj: object) -> OnedMarket:
    """An :class:`OnedMarket` from pyone's MARKETPLACE binding."""
    attrs = _template_attrs(getattr(obj, "TEMPLATE", None))
    driver = _str(obj, "MARKET_MAD") or attrs.get("MARKET_MAD", "")
    return OnedMarket(
        id=_int(obj, "ID"),
        name=_str(obj, "NAME"),
        driver=driver,
        attrs=attrs,
        state=_int(obj, "STATE", MARKET_STATE_ENABLED),
    )


def find_market(server: xmlrpc.client.ServerProxy, ref: str) -> OnedMarket:
    """The marketplace ``ref`` (an id, or a name) as oned describes it."""
    return _find(
        "marketplace", ref, server.market.info, server.marketpool.info, "MARKETPLACE",
        market_from_pyone,
    )  # fmt: skip


def usable_hosts(names: Iterable[str], timeout_s: float = HOSTS_TIMEOUT_S) -> set[str] | None:
    """The hosts among ``names`` that oned does not report disabled, offline or in error.

    A name oned does not know is kept (a storage host need not be a hypervisor). None when
    oned is not configured or does not answer within ``timeout_s``; never raises.
    """
    wanted = [n for n in names if n]
    try:
        server = connect(timeout_s=timeout_s)
        if server is None:
            return None
        pool = server.hostpool.info()
    except Exception as exc:  # noqa: BLE001 - callers fall back to the list as given
        driverlog.debug(f"host states not read from oned: {describe_failure(exc)}")
        return None
    states: dict[str, int] = {}
    for host in getattr(pool, "HOST", None) or []:
        try:
            states[str(host.NAME)] = int(host.STATE)
        except (TypeError, ValueError):
            continue
    return {n for n in wanted if states.get(n) not in UNUSABLE_HOST_STATES}


# ---------------------------------------------------------------------------- images, apps


@dataclass(frozen=True)
class OnedImage:
    id: int
    state: int
    size_mb: int
    error: str = ""

    @property
    def state_name(self) -> str:
        return IMAGE_STATE_NAMES.get(self.state, str(self.state))


@dataclass(frozen=True)
class OnedApp:
    id: int
    name: str
    state: int
    market_id: int
    market: str
    source: str
    md5: str
    size_mb: int
    format: str
    error: str = ""

    @property
    def state_name(self) -> str:
        return APP_STATE_NAMES.get(self.state, str(self.state))


@dataclass(frozen=True)
class OnedDatastore:
    id: int
    name: str
    type: int
    state: int

    @property
    def type_name(self) -> str:
        return DATASTORE_TYPE_NAMES.get(self.type, str(self.type))


def _error_of(obj: object) -> str:
    """The ``TEMPLATE/ERROR`` message oned leaves on an object whose operation failed."""
    return one_line(_template_attrs(getattr(obj, "TEMPLATE", None)).get("ERROR", ""), 1000)


def image_from_pyone(obj: object) -> OnedImage:
    return OnedImage(
        id=_int(obj, "ID"),
        state=_int(obj, "STATE"),
        size_mb=_int(obj, "SIZE", 0),
        error=_error_of(obj),
    )


def app_from_pyone(obj: object) -> OnedApp:
    return OnedApp(
        id=_int(obj, "ID"),
        name=_str(obj, "NAME"),
        state=_int(obj, "STATE"),
        market_id=_int(obj, "MARKETPLACE_ID"),
        market=_str(obj, "MARKETPLACE"),
        source=_str(obj, "SOURCE"),
        md5=_str(obj, "MD5"),
        size_mb=_int(obj, "SIZE", 0),
        format=_str(obj, "FORMAT"),
        error=_error_of(obj),
    )


def datastore_from_pyone(obj: object) -> OnedDatastore:
    return OnedDatastore(
        id=_int(obj, "ID"),
        name=_str(obj, "NAME"),
        type=_int(obj, "TYPE"),
        state=_int(obj, "STATE", 0),
    )


T = TypeVar("T")


def call(what: str, request: Callable[[], T]) -> T:
    """Run one oned call; any failure becomes one RemoteError line starting with ``what``.

    ``OneNoExistsException`` is left to the caller, which knows what a missing object means.
    """
    try:
        return request()
    except pyone.OneNoExistsException:
        raise
    except Exception as exc:  # noqa: BLE001 - any transport or binding failure: one line
        raise RemoteError(f"{what}: {describe_failure(exc)}") from None


def _find(
    kind: str,
    ref: str,
    info: Callable[[int], object],
    pool: Callable[[], object],
    members: str,
    convert: Callable[[Any], T],
) -> T:
    """The ``kind`` that ``ref`` names: an id (``info``), or a name unique in ``pool``."""
    ref = ref.strip()
    what = f"cannot read {kind} '{ref}' from oned"
    try:
        if ref.isascii() and ref.isdigit():
            return convert(call(what, lambda: info(int(ref))))
        listed = getattr(call(what, pool), members, None) or []
    except pyone.OneNoExistsException:
        raise ConfigError(f"oned has no {kind} with id {ref}") from None
    found = [o for o in listed if str(o.NAME) == ref]
    if not found:
        raise ConfigError(f"oned has no {kind} named '{ref}'")
    if len(found) > 1:
        ids = ", ".join(str(o.ID) for o in found)
        raise ConfigError(f"several {kind}s are named '{ref}' (ids {ids}): use the id")
    return convert(found[0])


def find_datastore(server: Any, ref: str) -> OnedDatastore:
    """The datastore ``ref`` (id or name); images can only be made in an IMAGE datastore."""
    ds = _find(
        "datastore", ref, server.datastore.info, server.datastorepool.info, "DATASTORE",
        datastore_from_pyone,
    )  # fmt: skip
    if ds.type != DATASTORE_TYPE_IMAGE:
        raise ConfigError(
            f"datastore {ds.id} '{ds.name}' is a {ds.type_name} datastore: "
            "--datastore must name an IMAGE datastore"
        )
    if ds.state == DATASTORE_STATE_DISABLED:
        raise ConfigError(f"datastore {ds.id} '{ds.name}' is disabled in oned")
    return ds


def allocate_image(server: Any, template: str, datastore_id: int) -> int:
    """``one.image.allocate``: oned checks the path, sizes it and starts the copy (LOCKED)."""
    return int(
        call(
            f"creating an image in datastore {datastore_id}",
            lambda: server.image.allocate(template, datastore_id, False),
        )
    )


def image_info(server: Any, image_id: int) -> OnedImage | None:
    """The image, or None once oned no longer has it."""
    try:
        return image_from_pyone(call(f"image {image_id}", lambda: server.image.info(image_id)))
    except pyone.OneNoExistsException:
        return None


def delete_image(server: Any, image_id: int) -> None:
    try:
        call(f"deleting image {image_id}", lambda: server.image.delete(image_id, False))
    except pyone.OneNoExistsException:
        return


def allocate_app(server: Any, template: str, market_id: int) -> int:
    """``one.marketapp.allocate``: oned records the app (LOCKED) and sends IMPORT to the MAD."""
    return int(
        call(
            f"creating an app in marketplace {market_id}",
            lambda: server.marketapp.allocate(template, market_id),
        )
    )


def app_info(server: Any, app_id: int) -> OnedApp | None:
    """The app, or None once oned no longer has it (a DELETE it sent has been answered)."""
    try:
        return app_from_pyone(call(f"app {app_id}", lambda: server.marketapp.info(app_id)))
    except pyone.OneNoExistsException:
        return None


def delete_app(server: Any, app_id: int) -> None:
    """``one.marketapp.delete``: oned sends DELETE to the MAD and drops the app on its answer."""
    try:
        call(f"deleting app {app_id}", lambda: server.marketapp.delete(app_id))
    except pyone.OneNoExistsException:
        return


def apps_with_source(server: Any, source: str) -> list[OnedApp]:
    """Every app oned lists whose SOURCE is ``source`` (any marketplace)."""
    try:
        pool = call("app pool", lambda: server.marketapppool.info(POOL_ALL, -1, -1))
    except pyone.OneNoExistsException:
        return []
    apps = [app_from_pyone(a) for a in (getattr(pool, "MARKETPLACEAPP", None) or [])]
    return [a for a in apps if a.source.strip() == source.strip()]
