"""Checksums computed on the bytes as they stream past, never trusted from elsewhere."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from ..errors import ChecksumError

ZERO_BLOCK_BYTES = 1 << 20
"""Size of the shared all-zero buffer used to hash holes (1 MiB, allocated once per process)."""
_ZEROS = memoryview(bytes(ZERO_BLOCK_BYTES))

Expected = str | Callable[[], str]
"""An MD5 to check against: known ("" for none), or asked for once the bytes are all read."""


class Digests:
    """MD5 (what oned stores and checks) and, when asked for, SHA-256 of a stream.

    SHA-256 serves only the s3 backend, which stores it as object metadata for the s3://
    downloader to verify against; an http import has no use for it (nothing stores it) and
    skips its cost (0.6-0.8 s of CPU per GiB).
    """

    def __init__(self, sha256: bool = True) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256() if sha256 else None
        self.size_bytes = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._md5.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.size_bytes += len(data)

    def feeders(self) -> list[Callable[[bytes | memoryview], None]]:
        """The ``update`` of each hash, to be fed from separate threads (hashlib releases the
        GIL on large buffers, so the hashes then run in parallel). Whoever feeds them
        records the byte count with :meth:`count`."""
        if self._sha256 is None:
            return [self._md5.update]
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
        """Hex SHA-256, or "" when it was not asked for."""
        return self._sha256.hexdigest() if self._sha256 is not None else ""

    def verify_md5(self, expected: Expected, what: str) -> None:
        """Fail when the export announced an MD5 and the bytes seen do not match it; a
        callable is asked only now (the MAD's overlapped import: the export may still run)."""
        expected = (expected() if callable(expected) else expected).strip().lower()
        if expected and expected != self.md5:
            raise ChecksumError(
                f"{what}: MD5 mismatch (export announced {expected}, read {self.md5})"
            )


class Verifier:
    """Checksums of any hashlib algorithm compared, at the end, with what was announced.

    ``expected`` holds ``(algorithm, hex digest, origin)``, the origin naming who announced it
    (``--md5``, ``object metadata sha256``, ``catalog``) in the mismatch message.
    """

    def __init__(self, what: str, expected: Iterable[tuple[str, str, str]] = ()) -> None:
        self.what = what
        self.expected = [(name, value.strip().lower(), origin) for name, value, origin in expected]
        self._hashers = {
            name: hashlib.new(name, usedforsecurity=False) for name, _, _ in self.expected
        }

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for h in self._hashers.values():
            h.update(data)

    def verify(self) -> None:
        for name, expected, origin in self.expected:
            got = self._hashers[name].hexdigest()
            if got != expected:
                raise ChecksumError(
                    f"{self.what}: {name.upper()} mismatch ({origin} {expected}, downloaded {got})"
                )
