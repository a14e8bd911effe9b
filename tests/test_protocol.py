"""The oned line codec: requests in, replies and LOG lines out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from onemarket import protocol
from onemarket.protocol import ProtocolError, Request, parse_request


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("IMPORT  42 abc=\n", Request("IMPORT", 42, "abc=")),
        ("MONITOR 7 Zm9v\n", Request("MONITOR", 7, "Zm9v")),
        ("DELETE   -   3   Zm9v  \r\n", Request("DELETE", 3, "Zm9v")),
        ("monitor\t\t8\tx\r\n", Request("MONITOR", 8, "x")),
        ("DELETE 5", Request("DELETE", 5, "")),
        ("INIT\n", Request("INIT", -1)),
        ("FINALIZE\r\n", Request("FINALIZE", -1)),
        ("DRIVER_CANCEL 12\n", Request("DRIVER_CANCEL", 12)),
        ("DRIVER_CANCEL  12\n", Request("DRIVER_CANCEL", 12)),
    ],
)
def test_parse_request(line: str, expected: Request) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    "line", ["", "\n", "   \r\n", "IMPORT\n", "IMPORT abc\n", "MONITOR - x y\n", "ECHO 1 2\n"]
)
def test_malformed_requests(line: str) -> None:
    with pytest.raises(ProtocolError):
        parse_request(line)


@pytest.mark.parametrize("action", ["MONITOR  ", "DRIVER_CANCEL ", "IMPORT - "])
def test_an_id_too_long_for_int_is_a_protocol_error(action: str) -> None:
    with pytest.raises(ProtocolError, match="id of 5000 chars"):
        parse_request(f"{action}{'1' * 5000} x")
    assert parse_request(f"{action}{'9' * protocol.MAX_ID_DIGITS} x").id == int("9" * 18)


def test_unknown_action_message_never_echoes_payload_bytes() -> None:
    payload = "PE1BUktFVF9EUklWRVJfQUNUSU9OX0RBVEE+c2VjcmV0PC8+"
    with pytest.raises(ProtocolError) as exc:
        parse_request(f"{payload} 1 2")
    assert payload[:8] not in str(exc.value) and "chars" in str(exc.value)
    with pytest.raises(ProtocolError, match="'HELLO'"):
        parse_request("HELLO 1 2")


@given(st.text(max_size=300))
def test_parse_request_never_raises_anything_else(line: str) -> None:
    try:
        req = parse_request(line)
    except ProtocolError:
        return
    assert req.action in protocol.ACTIONS
    assert " " not in req.payload and "\n" not in req.payload


def test_replies_are_single_lines() -> None:
    assert protocol.init_success() == "INIT SUCCESS\n"
    assert protocol.success("DELETE", 3) == "DELETE SUCCESS 3 -\n"
    assert protocol.success("MONITOR", 3, "") == "MONITOR SUCCESS 3 -\n"
    assert protocol.success("IMPORT", 4, "QUJD") == "IMPORT SUCCESS 4 QUJD\n"
    assert protocol.failure("IMPORT", 4, "a\nb\r\nc") == "IMPORT FAILURE 4 a; b; c\n"
    assert protocol.failure("IMPORT", 4, "  \n ") == "IMPORT FAILURE 4 -\n"


@given(st.text())
def test_failure_and_log_are_always_one_bounded_line(message: str) -> None:
    line = protocol.failure("MONITOR", 1, message)
    assert line.endswith("\n") and line.count("\n") == 1 and "\r" not in line
    assert len(line) <= len("MONITOR FAILURE 1 \n") + protocol.MAX_FAILURE_CHARS
    log = protocol.log(1, "INFO", message)
    assert log.endswith("\n") and log.count("\n") == 1 and "\r" not in log


def test_failure_is_cut() -> None:
    line = protocol.failure("MONITOR", 1, "x" * 5000)
    assert line.endswith("...\n")
    assert len(line) == len("MONITOR FAILURE 1 \n") + protocol.MAX_FAILURE_CHARS


@pytest.mark.parametrize(
    ("severity", "letter"),
    [("INFO", "I"), ("ERROR", "E"), ("WARN", "W"), ("WARNING", "W"), ("DEBUG", "D"), ("i", "I")],
)
def test_log_severities(severity: str, letter: str) -> None:
    assert protocol.log(9, severity, "hello") == f"LOG {letter} 9 hello\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("INFO: copying\n", ("INFO", "copying")),
        ("ERROR: 42: no space\r\n", ("ERROR", "no space")),
        ("WARN:x", ("WARN", "x")),
        ("WARNING : slow", ("WARNING", "slow")),
        ("DEBUG: -1: detail", ("DEBUG", "detail")),
        ("ERROR:", ("ERROR", "")),
        ("error: lower case is plain text", None),
        ("Traceback (most recent call last):", None),
        ("curl: (7) Failed to connect", None),
        (" INFO: indented", None),
    ],
)
def test_split_log_line(line: str, expected: tuple[str, str] | None) -> None:
    assert protocol.split_log_line(line) == expected
