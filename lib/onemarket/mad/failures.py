"""What an action's failure says: upstream's error block, signals, and no action data."""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import driverlog, protocol

ERROR_BLOCK_START = "ERROR MESSAGE --8<------"
ERROR_BLOCK_END = "ERROR MESSAGE ------>8--"
"""Markers of the error block that upstream scripts write (scripts_common.sh error_message):
when present, only the text between them is the failure, as in the stock MAD."""
SCRUB_WINDOW_CHARS = 64
"""Characters of a long base64 run compared with the payloads to tell a cut-out piece of one."""
_LONG_BASE64_RE = re.compile(r"[A-Za-z0-9+/=]{120,}")


def error_block(lines: list[str]) -> list[str]:
    """The lines inside upstream's ``ERROR MESSAGE --8<--`` block when there is one, else all."""
    try:
        start = lines.index(ERROR_BLOCK_START)
    except ValueError:
        return lines
    end = lines.index(ERROR_BLOCK_END, start) if ERROR_BLOCK_END in lines[start:] else len(lines)
    return lines[start + 1 : end] or lines


@dataclass
class Outcome:
    """How an executed action ended."""

    status: int
    """Exit code, or minus the signal number that killed it."""
    stdout: bytes = b""
    errors: list[str] = field(default_factory=list)
    killed: str = ""
    """Why the MAD killed it (timeout, cancel, stop), empty otherwise."""
    spawned: bool = True
    """False when it never ran (the program or a process could not be started)."""

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.killed

    def failure_text(self, label: str) -> str:
        if self.killed:
            return self.killed
        if self.errors:
            # masked before the cut: a cut through a URL's password would hide its scheme
            text = driverlog.scrub("; ".join(error_block(self.errors)))
            limit = protocol.MAX_FAILURE_CHARS
            return text if len(text) <= limit else "..." + text[-(limit - 3) :]
        if self.status < 0:
            try:
                name = signal.Signals(-self.status).name
            except ValueError:
                name = str(-self.status)
            return f"{label} was killed by signal {name}"
        return f"{label} failed with exit code {self.status} and no error message"


class Scrubber:
    """Removes action data (base64, which hides nothing) from lines an action wrote.

    Only what is secret is removed: a whole payload, and any long base64 run cut out of one
    (a script that logs part of its argument). Other long runs of base64-looking characters
    (a long SOURCE, bucket or key name) stay, so a failure keeps its cause.
    """

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        self._secrets = [
            s.decode("ascii", "replace") if isinstance(s, bytes) else s
            for s in secrets
            if s and len(s) >= 16
        ]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<action data>")
        return _LONG_BASE64_RE.sub(self._fragment, text)

    def _fragment(self, match: re.Match[str]) -> str:
        run = match.group()
        # a window from the middle: letters glued to either end ("arg" + payload) do not count
        start = len(run) // 4
        window = run[start : start + SCRUB_WINDOW_CHARS]
        if any(window in secret for secret in self._secrets):
            return "<base64 data>"
        return run
