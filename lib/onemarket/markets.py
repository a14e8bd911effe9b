"""Where ``one-market`` finds a marketplace: a template file, or a running oned (id or name).

A template file holds what ``onemarket create`` would get: ``NAME``, ``MARKET_MAD`` and the
driver attributes, in OpenNebula template syntax (read with the strict reader). ``ID`` may be
given; otherwise the market gets id -1, which no oned market has. Credentials are masked by
the code that reads them (``s3config``), before any request or message.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import oneclient
from .action import Market
from .backends.attributes import missing, redact
from .errors import ConfigError, MarketError, TemplateError
from .registry import backend_class
from .template import parse_template
from .units import parse_int, shown

MAX_TEMPLATE_BYTES = 1024 * 1024
"""Largest market template file read (a definition is a few hundred bytes)."""

PUBLIC_DRIVERS = frozenset({"one", "linuxcontainers"})
"""Drivers that only monitor a public catalog (no import, no delete)."""


def looks_like_path(ref: str) -> bool:
    """True when ``ref`` names a file rather than an oned marketplace id or name."""
    return os.sep in ref or ref.startswith(".") or Path(ref).is_file()


def market_from_template(text: str | bytes, what: str, default_name: str = "") -> Market:
    """A Market from template text (``what`` names its origin in messages)."""
    try:
        template = parse_template(text)
    except TemplateError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    attrs = template.as_dict()
    driver = attrs.get("MARKET_MAD", "").strip()
    if not driver:
        raise ConfigError(f"{what}: MARKET_MAD is missing (http, s3, one or linuxcontainers)")
    raw_id = attrs.get("ID", "-1").strip()
    try:
        market_id = parse_int(raw_id)
    except ValueError:
        raise ConfigError(f"{what}: ID must be an integer, not {shown(raw_id)}") from None
    name = attrs.get("NAME", "").strip() or default_name
    return Market(id=market_id, name=name, driver=driver, attrs=attrs)


def market_from_file(path: str | Path) -> Market:
    path = Path(path)
    what = f"market template {path}"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_TEMPLATE_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(f"{what}: is a directory, not a template file") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_TEMPLATE_BYTES} bytes")
    return market_from_template(data, what, default_name=path.stem)


def market_from_oned(ref: str, timeout_s: float = oneclient.CONNECT_TIMEOUT_S) -> Market:
    server = oneclient.connect(timeout_s=timeout_s)
    if server is None:
        where = oneclient.auth_file() or "ONE_AUTH"
        raise ConfigError(
            f"'{ref}' is not a template file, and oned is not configured to look it up "
            f"(no usable credentials in {where}; set ONE_AUTH and ONE_XMLRPC)"
        )
    return oneclient.find_market(server, ref)


def load_market(ref: str, timeout_s: float = oneclient.CONNECT_TIMEOUT_S) -> Market:
    """The marketplace named by ``ref``: a template file path, or an oned id or name."""
    if not ref.strip():
        raise ConfigError("no marketplace given")
    market = market_from_file(ref) if looks_like_path(ref) else market_from_oned(ref, timeout_s)
    with contextlib.suppress(MarketError):  # an unknown driver is reported where it is used
        redact(market, backend_class(market.driver).attributes)
    return market


def missing_attrs(market: Market) -> list[str]:
    """Required attributes (as the driver declares them) that the market lacks or leaves empty."""
    return missing(market, backend_class(market.driver).attributes)
