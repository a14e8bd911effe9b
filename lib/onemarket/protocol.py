"""oned <-> MAD line codec: requests in, replies and LOG lines out.

Request: ``ACTION STATUS ID PAYLOAD`` where oned leaves STATUS empty (``IMPORT  42 <b64>``),
so fields are split on runs of blanks and a missing status is tolerated. Replies are
``ACTION RESULT ID INFO`` and always exactly one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import one_line
from .units import parse_int

ACTIONS = ("INIT", "IMPORT", "DELETE", "MONITOR", "DRIVER_CANCEL", "FINALIZE")
LOG_SEVERITIES = {"INFO": "I", "ERROR": "E", "WARN": "W", "WARNING": "W", "DEBUG": "D"}
MAX_FAILURE_CHARS = 1000
"""Longest failure text sent to oned (it ends up in the app's error message)."""

MAX_ID_DIGITS = 18
"""Longest id accepted: oned's ids are C ints (10 digits); 18 still fits an int64 and keeps
``int()`` far from Python's 4,300-digit conversion limit (units.parse_int checks it)."""
_INT_RE = re.compile(r"-?[0-9]+")
_WORD_RE = re.compile(r"[A-Za-z_]{1,24}")


@dataclass(frozen=True)
class Request:
    action: str
    id: int
    payload: str = ""


class ProtocolError(ValueError):
    """A line that is not a request oned would send."""


def parse_request(line: str) -> Request:
    """Parse one line from oned; raise ProtocolError for anything malformed."""
    fields = line.rstrip("\r\n").split()
    if not fields:
        raise ProtocolError("empty line")
    action = fields[0].upper()
    if action not in ACTIONS:
        # the word is shown only when it looks like an action name: never echo payload bytes
        shown = repr(fields[0]) if _WORD_RE.fullmatch(fields[0]) else f"({len(fields[0])} chars)"
        raise ProtocolError(f"unknown action {shown}")
    if action in ("INIT", "FINALIZE"):
        return Request(action, -1)
    rest = fields[1:]
    # oned sends "ACTION  ID PAYLOAD" (empty status); tolerate "ACTION STATUS ID PAYLOAD" too
    if rest and not _INT_RE.fullmatch(rest[0]) and len(rest) >= 2 and _INT_RE.fullmatch(rest[1]):
        rest = rest[1:]
    if not rest or not _INT_RE.fullmatch(rest[0]):
        raise ProtocolError(f"{action} without a numeric id")
    try:
        request_id = parse_int(rest[0], MAX_ID_DIGITS)
    except ValueError:
        too_long = f"{len(rest[0])} chars (at most {MAX_ID_DIGITS} digits)"
        raise ProtocolError(f"{action} with an id of {too_long}") from None
    payload = rest[1] if len(rest) > 1 else ""
    return Request(action, request_id, payload)


def _clean(text: str, limit: int) -> str:
    return one_line(text, limit) or "-"


def init_success() -> str:
    """The answer to ``INIT`` (oned reads ``INIT SUCCESS`` with no id)."""
    return "INIT SUCCESS\n"


def success(action: str, id_: int, info: str = "-") -> str:
    return f"{action} SUCCESS {id_} {info or '-'}\n"


def failure(action: str, id_: int, message: str) -> str:
    return f"{action} FAILURE {id_} {_clean(message, MAX_FAILURE_CHARS)}\n"


def log(id_: int, severity: str, message: str) -> str:
    sev = LOG_SEVERITIES.get(severity.upper(), severity[:1].upper() or "I")
    return f"LOG {sev} {id_} {_clean(message, 4 * MAX_FAILURE_CHARS)}\n"


_LOG_LINE_RE = re.compile(r"^(ERROR|INFO|WARN|WARNING|DEBUG)\s*:\s*(?:(-?\d+)\s*:\s*)?(.*)$")


def split_log_line(line: str) -> tuple[str, str] | None:
    """``(severity, message)`` for an ``INFO: ...``-style stderr line, else None.

    The optional number after the colon (``ERROR: 42: text``) is an id in upstream's format;
    the MAD always logs with the action's own id, so it is dropped.
    """
    m = _LOG_LINE_RE.match(line.rstrip("\r\n"))
    if not m:
        return None
    return m.group(1), m.group(3)
