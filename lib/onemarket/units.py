"""Sizes as OpenNebula counts them: its "MB" (SIZE, USED_MB, TOTAL_MB...) is 2^20 bytes."""

from __future__ import annotations

from .driverlog import scrub

MIB = 1 << 20
"""Bytes in one of oned's MB."""


def size_mb(size_bytes: int) -> int:
    """Bytes in MB, rounded up: a non-empty image is at least 1 MB."""
    return -(-size_bytes // MIB)


def mb_bytes(mb: int) -> int:
    """MB in bytes."""
    return mb * MIB


MAX_INT_DIGITS = 30
"""Most digits of a whole number read from outside (a command line, a query string, a header,
a JSON field). 2^64 has 20: no real size, id or time is longer. Checked before ``int()``, which
raises its own ValueError past 4,300 digits (after quadratic work) where callers expect none."""
SHOWN_CHARS = 24
"""How much of a refused value a message shows."""


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters with its length when cut;
    masked first (driverlog.scrub), as a cut URL would no longer show its password."""
    text = scrub(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def parse_int(text: str, max_digits: int = MAX_INT_DIGITS) -> int:
    """A decimal integer (ASCII digits, an optional sign, blanks around); ValueError with a
    short message naming the value for anything else, more than ``max_digits`` digits too."""
    body = text.strip()
    digits = body[1:] if body[:1] in ("+", "-") else body
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"{shown(text)} is not a whole number")
    if len(digits) > max_digits:
        raise ValueError(f"{shown(text)} has more than {max_digits} digits")
    return int(body)
