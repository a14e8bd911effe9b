"""Error messages: one line for an administrator, whatever the cause looked like."""

from __future__ import annotations

import errno

import pytest
from onemarket import errors
from onemarket.errors import (
    ActionTimeout,
    ChecksumError,
    ConfigError,
    MarketError,
    NotSupportedError,
    PayloadError,
    RemoteError,
    SourceError,
    StorageError,
    StorageFullError,
    TemplateError,
    UnsafePathError,
    from_os_error,
    one_line,
)


def test_one_line_joins_and_cuts() -> None:
    assert one_line("a\nb\r\nc\rd") == "a; b; c; d"
    assert one_line("  first  \n\n   \n second ") == "first; second"
    assert one_line("") == ""
    assert one_line("x" * 50, limit=10) == "xxxxxxx..."
    assert len(one_line("y" * 10_000)) == errors.MAX_MESSAGE_CHARS
    assert one_line(ValueError("a\nb")) == "a; b"  # type: ignore[arg-type]


def test_one_line_removes_control_characters() -> None:
    assert one_line("nul\x00bell\x07esc\x1b[31m tab\tok") == "nul bell esc [31m tab ok"
    assert one_line("csi\x9b31m nel\x85 del\x7f") == "csi 31m nel  del"
    assert one_line("a\x85b\u2028c") == "a b c"
    assert "\n" not in one_line("\x0b\x0c\x1c\x1d\x1e")


@pytest.mark.parametrize(
    "cls",
    [
        ConfigError,
        PayloadError,
        TemplateError,
        SourceError,
        StorageError,
        StorageFullError,
        ChecksumError,
        RemoteError,
        UnsafePathError,
        NotSupportedError,
        ActionTimeout,
    ],
)
def test_every_error_is_a_one_line_market_error(cls: type[MarketError]) -> None:
    exc = cls("first line\nsecond line\x00")
    assert isinstance(exc, MarketError)
    assert str(exc) == "first line; second line"


def test_storage_full_is_a_storage_error() -> None:
    assert issubclass(StorageFullError, StorageError)


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (errno.ENOSPC, StorageFullError, "write /srv/a: storage full (No space left on device)"),
        (errno.EDQUOT, StorageFullError, "write /srv/a: storage full (Disk quota exceeded)"),
        (errno.EACCES, StorageError, "write /srv/a: permission denied (Permission denied)"),
        (errno.EPERM, StorageError, "write /srv/a: permission denied (Operation not permitted)"),
        (errno.EROFS, StorageError, "write /srv/a: permission denied (Read-only file system)"),
        (errno.ENOENT, StorageError, "write /srv/a: no such file or directory"),
        (errno.EIO, StorageError, "write /srv/a: Input/output error"),
    ],
)
def test_from_os_error(code: int, cls: type[MarketError], text: str) -> None:
    import os

    exc = from_os_error(OSError(code, os.strerror(code), "/srv/a"), "write /srv/a")
    assert type(exc) is cls
    assert str(exc) == text


def test_from_os_error_without_errno() -> None:
    exc = from_os_error(OSError("strange\nfailure"), "read x")
    assert str(exc) == "read x: strange; failure"
