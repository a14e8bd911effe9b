"""Bounded line splitting, for oned's requests and for an action's stderr alike."""

from __future__ import annotations


class LineSplitter:
    """Cuts a byte stream into lines without ever holding more than ``max_bytes`` of one.

    A longer line is reported once, with its first ``keep_bytes`` only and ``truncated=True``
    (enough to answer a request by its action and id, or to show the start of a message); the
    rest of it is skipped up to its newline.
    """

    def __init__(self, max_bytes: int, keep_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.keep_bytes = keep_bytes
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The lines ``data`` completes, each with whether it was cut."""
        lines: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            self._take(data[start : len(data) if nl < 0 else nl])
            if nl < 0:
                return lines
            lines.append((bytes(self._buf), self._skipping))
            self._buf.clear()
            self._skipping = False
            start = nl + 1

    def finish(self) -> list[tuple[bytes, bool]]:
        """At end of stream: the last line if it had no newline."""
        if not self._buf:
            return []
        line = (bytes(self._buf), self._skipping)
        self._buf.clear()
        self._skipping = False
        return [line]

    def _take(self, chunk: bytes) -> None:
        if self._skipping:
            return
        self._buf += chunk
        if len(self._buf) > self.max_bytes:
            del self._buf[self.keep_bytes :]
            self._skipping = True
