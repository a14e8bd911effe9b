"""One exception hierarchy; every message is one line written for an administrator.

The MAD sends ``str(error)`` to oned as the failure text, so messages name the object and the
cause and never carry secrets, payloads or tracebacks. Every message goes through
:func:`one_line` when the error is made: registered secrets and URL passwords are masked there
by ``driverlog.scrub``, the same rule as log lines (driverlog imports nothing of the package,
so this import makes no cycle).
"""

from __future__ import annotations

import errno

from .driverlog import CONTROL_RE, scrub


class MarketError(Exception):
    """Root of every error this package raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ConfigError(MarketError):
    """The marketplace definition (template attributes) is missing or wrong."""


class PayloadError(MarketError):
    """The action data sent by oned cannot be decoded."""


class TemplateError(MarketError):
    """An OpenNebula template cannot be parsed."""


class SourceError(MarketError):
    """The image to import cannot be read."""


class StorageError(MarketError):
    """The marketplace storage (folder, bucket) refused an operation."""


class StorageFullError(StorageError):
    """No space left where the appliance is written."""


class ChecksumError(MarketError):
    """The bytes seen do not match the checksum announced for them."""


class RemoteError(MarketError):
    """A remote endpoint (catalog, S3, ssh host) failed or is unreachable."""


class UnsafePathError(MarketError):
    """A path derived from a message would leave its folder."""


class NotSupportedError(MarketError):
    """The driver does not implement this action."""


class ActionTimeout(MarketError):
    """An action ran past its time limit."""


MAX_MESSAGE_CHARS = 2000
"""Longest failure line sent to oned (it ends up in the app's error message)."""


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` safe to show as one line: secrets and URL passwords masked (``driverlog.scrub``)
    before the cut, so a cut never leaves part of one; lines joined with ``; ``; other control
    characters (``driverlog.CONTROL_RE``) blanked; cut to ``limit`` characters."""
    lines = scrub(str(text)).replace("\r", "\n").split("\n")
    parts = [CONTROL_RE.sub(" ", p).strip() for p in lines]
    line = "; ".join(p for p in parts if p)
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def from_os_error(exc: OSError, what: str) -> MarketError:
    """Turn an OS error into a domain error that says what failed and why."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"{what}: storage full ({reason})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{what}: permission denied ({reason})")
    if exc.errno == errno.ENOENT:
        return StorageError(f"{what}: no such file or directory")
    return StorageError(f"{what}: {reason}")
