"""Readers of IMPORT_SOURCE that run a helper process (ssh, the stock downloader)."""

from __future__ import annotations

import os
import signal
import sys
import types

import pytest
from onemarket.errors import SourceError
from onemarket.transfer.sources import HttpBody, ProcessSource, read_pipe

LOUD = "import sys; sys.stderr.write('x' * 300_000 + 'the cause'); sys.stdout.write('hello')"


def read_all(src: ProcessSource) -> bytes:
    chunks = []
    while chunk := src.read(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_helper_writing_much_on_stderr_never_blocks() -> None:
    src = ProcessSource([sys.executable, "-c", LOUD], "loud helper")
    try:
        assert read_all(src) == b"hello"
    finally:
        src.close()


def test_a_failing_helper_reports_the_end_of_its_stderr() -> None:
    src = ProcessSource([sys.executable, "-c", LOUD + "; sys.exit(3)"], "loud helper")
    try:
        with pytest.raises(SourceError, match=r"the cause$"):
            read_all(src)
    finally:
        src.close()


def test_a_missing_helper_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="cannot start"):
        ProcessSource(["/nonexistent/helper"], "nothing")


def test_a_password_in_a_source_url_is_masked() -> None:
    from onemarket import driverlog
    from onemarket.transfer.sources import open_source

    url = "http://admin:s3cr3t-pw@127.0.0.1:9/image"
    with pytest.raises(SourceError) as caught, open_source(url):
        pass
    assert "s3cr3t-pw" not in driverlog.scrub(str(caught.value))


def test_a_content_length_of_unicode_digits_is_no_size() -> None:
    """'²' is a digit to str.isdigit() and no number to int(): the size is unknown, no crash."""

    response = types.SimpleNamespace(headers={"Content-Length": "\u00b2"})
    assert HttpBody(response).size_bytes is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("length", "size"), [("9" * 5000, None), ("-1", None), ("42", 42)])
def test_a_content_length_of_thousands_of_digits_is_no_size(length: str, size: int | None) -> None:
    response = types.SimpleNamespace(headers={"Content-Length": length})
    assert HttpBody(response).size_bytes == size  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:s3cr3t-pw@[::1/x", "unbalanced '[' or ']' around an IPv6 address"),
        ("http://[::1/x", "unbalanced '[' or ']' around an IPv6 address"),
        ("https://u:s3cr3t-pw@h:99x/x", "its port is not a number from 0 to 65535"),
        ("https://h:70000/x", "its port is not a number from 0 to 65535"),
        (f"https://h:{'9' * 5000}/x", "its port is not a number from 0 to 65535"),
        (
            "http://u:s3cr3t-pw@h\uff03x/",
            "its host holds characters that NFKC normalization changes",
        ),
    ],
)
def test_a_malformed_import_source_url_is_one_source_error_without_it(
    url: str, reason: str
) -> None:
    """urllib's ValueError used to end the import as 'internal error ...: Invalid IPv6 URL'."""
    from onemarket.transfer.sources import open_source

    with pytest.raises(SourceError) as caught, open_source(url):
        pass
    assert str(caught.value) == f"IMPORT_SOURCE is not a valid URL ({reason})"


def test_a_pipe_read_fills_its_size_and_ends_at_eof() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"abc")
        assert read_pipe(read_end, 3) == b"abc"
        os.write(write_end, b"x" * 10)
        assert read_pipe(read_end, 4) == b"xxxx"
        os.close(write_end)
        write_end = -1
        assert read_pipe(read_end, 100) == b"xxxxxx"  # the end: fewer than asked
        assert read_pipe(read_end, 100) == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _raise_timeout(*_: object) -> None:
    raise TimeoutError


def test_a_silent_pipe_lets_a_stop_signal_through() -> None:
    """The wait for a silent writer is in pieces, so the handler runs (it did before too when
    the signal interrupted the read; a signal landing just before the read did not)."""
    read_end, write_end = os.pipe()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(TimeoutError):
            read_pipe(read_end, 10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(read_end)
        os.close(write_end)
