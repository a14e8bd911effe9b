"""Files of random bytes for tests and benchmarks, with their checksums."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WRITE_CHUNK_BYTES = 8 << 20
"""Bytes generated and written at a time (8 MiB of memory)."""


def write_random(path: Path, size: int) -> tuple[str, str]:
    """Write ``size`` random bytes to ``path``; return their md5 and sha256."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, WRITE_CHUNK_BYTES))
            f.write(chunk)
            md5.update(chunk)
            sha.update(chunk)
            left -= len(chunk)
    return md5.hexdigest(), sha.hexdigest()
