"""The MAD's command-line options: the stock MAD's ``-t``, ``-m``, ``-w`` and ``-p``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from ..units import parse_int, shown

DEFAULT_CONCURRENCY = 15
"""Actions run at once (``-t``); each is a process, so this bounds processes and memory."""


class UsageError(ValueError):
    """Options the MAD cannot start with; the message says which and why."""


@dataclass(frozen=True)
class Options:
    concurrency: int = DEFAULT_CONCURRENCY
    drivers: tuple[str, ...] | None = None
    timeout_s: float | None = None
    proxy: str | None = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = parse_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {shown(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {shown(text)}") from None
    if not math.isfinite(value) or value < 0:  # "inf" or "nan": 0 is the way to say none
        raise argparse.ArgumentTypeError(f"must be 0 (no timeout) or more: {shown(text)}")
    return value


def parse_args(argv: Sequence[str]) -> Options:
    """Options already split into words; anything else raises UsageError (the start-up
    answers it with ``INIT FAILURE``)."""
    parser = _Parser(
        prog="one_market",
        description="OpenNebula marketplace driver (MAD): reads oned's requests on stdin.",
    )
    parser.add_argument(
        "-t", "--threads", type=_positive_int, default=DEFAULT_CONCURRENCY,
        help=f"actions run at once (default {DEFAULT_CONCURRENCY}); more requests wait",
    )  # fmt: skip
    parser.add_argument(
        "-m", "--market-types", default=None,
        help="enabled drivers, comma separated (default: every folder of remotes/market)",
    )  # fmt: skip
    parser.add_argument(
        "-w", "--timeout", type=_seconds, default=0.0,
        help="seconds each executed action may run (0: no limit)",
    )  # fmt: skip
    parser.add_argument("-p", "--proxy", default=None, help="http(s) proxy for the actions")
    ns = parser.parse_args(list(argv))
    drivers = None
    if ns.market_types is not None:
        drivers = tuple(d.strip() for d in ns.market_types.split(",") if d.strip())
    return Options(
        concurrency=ns.threads,
        drivers=drivers,
        timeout_s=ns.timeout or None,
        proxy=ns.proxy or None,
    )
