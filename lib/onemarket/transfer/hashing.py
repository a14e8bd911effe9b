"""Checksums computed on the bytes as they stream past, never trusted from elsewhere."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ..errors import ChecksumError

ZERO_BLOCK_BYTES = 1 << 20
"""Size of the shared all-zero buffer used to hash holes (1 MiB, allocated once per process)."""
_ZEROS = memoryview(bytes(ZERO_BLOCK_BYTES))


class Digests:
    """MD5 (what oned stores) and SHA-256 (what we keep for our own verification) of a stream."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256()
        self.size_bytes = 0

    def update(self, data: bytes | memoryview) -> None:
        self._md5.update(data)
        self._sha256.update(data)
        self.size_bytes += len(data)

    def feeders(self) -> list[Callable[[bytes | memoryview], None]]:
        """The ``update`` of each hash, to be fed from separate threads (hashlib releases the
        GIL on large buffers, so MD5 and SHA-256 then run in parallel). Whoever feeds them
        records the byte count with :meth:`count`."""
        return [self._md5.update, self._sha256.update]

    def count(self, n: int) -> None:
        self.size_bytes += n

    def update_zeros(self, count: int) -> None:
        """Hash ``count`` zero bytes (a hole of a sparse source) without allocating them."""
        while count > 0:
            piece = _ZEROS[: min(count, ZERO_BLOCK_BYTES)]
            self.update(piece)
            count -= len(piece)

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def verify_md5(self, expected: str, what: str) -> None:
        """Fail when the export announced an MD5 and the bytes seen do not match it."""
        expected = expected.strip().lower()
        if expected and expected != self.md5:
            raise ChecksumError(
                f"{what}: MD5 mismatch (export announced {expected}, read {self.md5})"
            )


def size_mb(size_bytes: int) -> int:
    """Size in MB as oned counts it: rounded up, at least 1 for a non-empty image."""
    return (size_bytes + (1 << 20) - 1) >> 20
