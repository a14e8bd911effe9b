"""Market attributes, declared once per driver and read by one parser.

Each driver lists its attributes as :class:`Attr` rows (the README's attribute tables show the
same rows); :func:`read` checks the required ones, applies defaults and validators, and turns a
validator's ``ValueError`` into one ConfigError naming the market and the attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import driverlog
from ..action import Market
from ..errors import ConfigError
from ..units import parse_int, shown

YES = frozenset({"yes", "true", "1", "on"})


@dataclass(frozen=True)
class Attr:
    """One market attribute: what it is, its default as written, and how it is read."""

    name: str
    help: str
    default: str | None = None
    required: bool = False
    parse: Callable[[str], Any] = str.strip
    """Text (stripped, never empty) to value; raises ValueError with the end of a sentence
    that starts with the attribute name (``must be ..., not 'x'``)."""
    secret: bool = False
    """Masked in every message of the process once the market is read (:func:`redact`)."""


def redact(market: Market, attributes: Sequence[Attr]) -> None:
    """Mask the values of ``market``'s secret attributes in every later message and log line,
    before anything can fail and quote them."""
    for attr in attributes:
        if attr.secret:
            driverlog.redact(market.attrs.get(attr.name, "").strip())


def flag(text: str) -> bool:
    """OpenNebula's lenient yes/no: ``yes``, ``true``, ``1``, ``on`` are yes, anything else no."""
    return text.strip().lower() in YES


def yes_no(text: str) -> bool:
    """A strict yes/no: a typo is an error, not a silent no."""
    word = text.strip().lower()
    if word in YES:
        return True
    if word in ("no", "false", "0", "off"):
        return False
    raise ValueError(f"{text[:80]!r} is invalid: expected yes or no")


def positive(kind: Callable[[str], float]) -> Callable[[str], str]:
    """A positive number (``int`` or ``float``), kept as written."""

    def parse(text: str) -> str:
        try:
            ok = kind(text) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{text[:80]!r} is invalid: expected a positive number")
        return text

    return parse


def count(text: str) -> int:
    """A non-negative integer."""
    try:
        value = parse_int(text)
    except ValueError:
        raise ValueError(f"must be an integer, not {shown(text)}") from None
    if value < 0:
        raise ValueError("is negative")
    return value


def missing(market: Market, table: Iterable[Attr]) -> list[str]:
    """Required attributes the market lacks or leaves blank."""
    return [a.name for a in table if a.required and not market.attrs.get(a.name, "").strip()]


def read(market: Market, table: Iterable[Attr]) -> dict[str, Any]:
    """Every attribute of ``table``: parsed value, or the parsed default (None without one)."""
    table = list(table)
    absent = missing(market, table)
    if absent:
        raise ConfigError(
            f"marketplace '{market.name}' ({market.driver}) is missing required attribute"
            f"{'s' if len(absent) > 1 else ''} {', '.join(absent)}"
        )
    values: dict[str, Any] = {}
    for attr in table:
        raw = market.attrs.get(attr.name, "").strip() or attr.default
        if raw is None:
            values[attr.name] = None
            continue
        try:
            values[attr.name] = attr.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"marketplace '{market.name}': {attr.name} {exc}") from None
    return values
