"""Sizes as OpenNebula counts them: its "MB" (SIZE, USED_MB, TOTAL_MB...) is 2^20 bytes."""

from __future__ import annotations

MIB = 1 << 20
"""Bytes in one of oned's MB."""


def size_mb(size_bytes: int) -> int:
    """Bytes in MB, rounded up: a non-empty image is at least 1 MB."""
    return -(-size_bytes // MIB)


def mb_bytes(mb: int) -> int:
    """MB in bytes."""
    return mb * MIB
