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
"""

from __future__ import annotations

import os
import xmlrpc.client
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyone
import requests

from . import driverlog
from .action import Market
from .errors import ConfigError, RemoteError, one_line

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


def _home() -> Path | None:
    home = os.environ.get("HOME", "")
    return Path(home) if home else None


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
    # timeout=None: pyone would otherwise set the process-wide socket default timeout
    server = pyone.OneServer(uri, session=session, timeout=None)
    if not isinstance(server, xmlrpc.client.ServerProxy):
        return None  # ONEAPI_PROTOCOL asked for gRPC, which this client does not speak
    # ServerProxy keeps its transport in a private attribute; swap in the bounded one.
    server._ServerProxy__transport = _TimeoutTransport(timeout_s, uri.startswith("https"))  # type: ignore[attr-defined]
    return server


def describe_failure(exc: BaseException) -> str:
    """One line about a failed oned call, without the session string."""
    if isinstance(exc, pyone.OneAuthenticationException):
        return "oned refused the credentials of ONE_AUTH"
    if isinstance(exc, pyone.OneAuthorizationException):
        return "oned denied the request to the user of ONE_AUTH"
    if isinstance(exc, requests.Timeout):
        return "oned did not answer in time"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect to oned"
    if isinstance(exc, xmlrpc.client.ProtocolError):
        return f"oned answered HTTP {exc.errcode}"
    text = one_line(driverlog.scrub(str(exc)), 300)
    return f"oned call failed: {text or type(exc).__name__}"


def _template_attrs(template: object) -> dict[str, str]:
    """Single-valued attributes of a pyone TEMPLATE (an ordered dict; vectors left out)."""
    if not isinstance(template, Mapping):
        return {}
    return {str(k): v.strip() for k, v in template.items() if isinstance(v, str)}


def market_from_pyone(obj: object) -> Market:
    """A :class:`Market` from pyone's MARKETPLACE binding."""
    attrs = _template_attrs(getattr(obj, "TEMPLATE", None))
    driver = str(getattr(obj, "MARKET_MAD", "") or attrs.get("MARKET_MAD", ""))
    raw_id = getattr(obj, "ID", -1)
    return Market(
        id=int(raw_id) if raw_id is not None else -1,
        name=str(getattr(obj, "NAME", "") or ""),
        driver=driver,
        attrs=attrs,
    )


def find_market(server: xmlrpc.client.ServerProxy, ref: str) -> Market:
    """The marketplace ``ref`` (an id, or a name) as oned describes it."""
    try:
        if ref.strip().isdigit():
            return market_from_pyone(server.market.info(int(ref)))
        pool = server.marketpool.info()
    except pyone.OneNoExistsException:
        raise ConfigError(f"oned has no marketplace with id {ref}") from None
    except Exception as exc:  # noqa: BLE001 - any transport or binding failure: one line
        raise RemoteError(
            f"cannot read marketplace '{ref}' from oned: {describe_failure(exc)}"
        ) from None
    matches = [m for m in (getattr(pool, "MARKETPLACE", None) or []) if str(m.NAME) == ref]
    if not matches:
        raise ConfigError(f"oned has no marketplace named '{ref}'")
    if len(matches) > 1:
        ids = ", ".join(str(m.ID) for m in matches)
        raise ConfigError(f"several marketplaces are named '{ref}' (ids {ids}): use the id")
    return market_from_pyone(matches[0])


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
