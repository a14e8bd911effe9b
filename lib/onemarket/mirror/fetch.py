"""Download the files of the mirror's entries, verified, in a bounded number of threads.

Each file is read with the transfer layer's :class:`~onemarket.transfer.sources.HttpSource`
(redirects followed, the catalog server's ``/download/<n>`` answers one) from a session made by
:func:`onemarket.web.make_session` (connection retries, proxies from the environment), and
written by :meth:`LocalStore.insert` (hashed while streaming, staged atomically). A file that
fails (truncated, wrong checksum, server error) is tried again up to ``FILE_ATTEMPTS`` times;
then its entry fails and the others go on. A full or read-only disk is not retried.

Cancelling (a signal in the main thread) sets an event that every read checks, so the threads
stop within one chunk and the atomic writer removes what they were writing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import requests

from ..errors import ChecksumError, MarketError, StorageError
from ..transfer.sources import CHUNK_BYTES, HttpSource
from ..web import make_session
from .model import MirrorEntry, MirrorFile
from .store import LocalStore

FILE_ATTEMPTS = 3
"""Downloads of one file before its entry is reported failed (1 + 2 retries)."""
RETRY_WAIT_S = 1.0
"""Wait before the second attempt of a file, doubled before each next one."""
MAX_FAILURES_IN_ROW = 5
"""Entries failing one after the other before the rest are not tried (a source that went down
would otherwise cost every remaining file its attempts and timeouts)."""


class Cancelled(MarketError):
    """The run is being stopped (signal): downloads end at their next chunk."""


class Watcher(Protocol):
    """What the fetcher tells of each file it downloads (the reporter's progress bars); called
    from the download threads, so implementations must be thread-safe and quick."""

    def file_started(self, entry: MirrorEntry, f: MirrorFile) -> None:
        """``f``, a file of ``entry``, is about to be downloaded."""

    def file_bytes(self, f: MirrorFile, n: int) -> None:
        """``n`` bytes of ``f`` read; negative when a failed attempt's bytes are taken back."""

    def file_ended(self, f: MirrorFile) -> None:
        """``f`` is done with, downloaded or not."""


class NoWatcher:
    """A :class:`Watcher` that wants to know nothing."""

    def file_started(self, entry: MirrorEntry, f: MirrorFile) -> None:
        pass

    def file_bytes(self, f: MirrorFile, n: int) -> None:
        pass

    def file_ended(self, f: MirrorFile) -> None:
        pass


@dataclass
class EntryResult:
    entry: MirrorEntry
    fetched: list[MirrorFile] = field(default_factory=list)
    """Files downloaded and staged by this run."""
    reused: list[MirrorFile] = field(default_factory=list)
    """Files staged by an earlier, interrupted run (verified then, not downloaded again)."""
    error: str = ""
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def staged(self) -> list[MirrorFile]:
        return self.fetched + self.reused


class _Watched:
    """A source that counts its bytes and stops when the run is cancelled."""

    def __init__(
        self, source: HttpSource, size: int | None, cancel: threading.Event, count: Callable
    ) -> None:
        self._source = source
        self._cancel = cancel
        self._count = count
        self.description = source.description
        self.size_bytes = size if size is not None else source.size_bytes

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        if self._cancel.is_set():
            raise Cancelled(f"download of {self.description} cancelled")
        data = self._source.read(n)
        self._count(len(data))
        return data


class Fetcher:
    """Downloads files into ``store``; thread-safe (one HTTP session per thread)."""

    def __init__(
        self,
        store: LocalStore,
        user_agent: str,
        cancel: threading.Event,
        watcher: Watcher | None = None,
    ) -> None:
        self.store = store
        self.user_agent = user_agent
        self.cancel = cancel
        self.watcher: Watcher = watcher or NoWatcher()
        self.requests = 0
        self.failures_in_row = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._active: dict[int, object] = {}

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = make_session(self.user_agent)
            session.headers["Accept-Encoding"] = "identity"
            session.hooks["response"].append(self._track)
            with self._lock:
                self._sessions.append(session)
        return session

    def _track(self, response: requests.Response, *_args: object, **_kwargs: object) -> None:
        """Remember the thread's answer being read, so :meth:`abort` can shut it down."""
        with self._lock:
            self._active[threading.get_ident()] = response.raw

    def abort(self) -> None:
        """Cancel: shut down the connections being read, so that a read blocked on a stalled
        server returns now instead of after its timeout (urllib3's ``shutdown``)."""
        self.cancel.set()
        with self._lock:
            answers = list(self._active.values())
        for raw in answers:
            shutdown = getattr(raw, "shutdown", None)  # urllib3 >= 2.3
            if shutdown is not None:
                with contextlib.suppress(Exception):
                    shutdown()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def fetch_entry(self, entry: MirrorEntry) -> EntryResult:
        """Every file of ``entry`` that is neither published nor staged yet; never raises for
        a bad file (the result says why), only :class:`Cancelled`."""
        result = EntryResult(entry)
        if self.failures_in_row >= MAX_FAILURES_IN_ROW:
            result.error = f"not tried: the source failed {self.failures_in_row} times in a row"
            return result
        for f in entry.files:
            if self.store.exists(f):
                continue
            if self.store.staged(f):
                result.reused.append(f)
                continue
            try:
                result.bytes += self.fetch_file(entry, f)
            except Cancelled:
                raise
            except MarketError as exc:
                result.error = str(exc)
                if not isinstance(exc, StorageError):
                    with self._lock:
                        self.failures_in_row += 1
                return result
            result.fetched.append(f)
        with self._lock:
            self.failures_in_row = 0
        return result

    def fetch_file(self, entry: MirrorEntry, f: MirrorFile) -> int:
        """Download ``f`` into its staged name; bytes read (of the last attempt)."""
        self.watcher.file_started(entry, f)
        try:
            return self._attempts(f)
        finally:
            self.watcher.file_ended(f)

    def _attempts(self, f: MirrorFile) -> int:
        wait_s = RETRY_WAIT_S
        for attempt in range(1, FILE_ATTEMPTS + 1):
            counted = [0]

            def count(n: int, counted: list[int] = counted) -> None:
                counted[0] += n
                self.watcher.file_bytes(f, n)

            try:
                self._download(f, count)
                return counted[0]
            except (Cancelled, StorageError):
                raise
            except MarketError:
                self.watcher.file_bytes(f, -counted[0])  # the progress counts them once
                if attempt == FILE_ATTEMPTS:
                    raise
            if self.cancel.wait(wait_s):
                raise Cancelled(f"download of {f.url} cancelled")
            wait_s *= 2
        raise AssertionError("unreachable")

    def _download(self, f: MirrorFile, count: Callable[[int], None]) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"download of {f.url} cancelled")
        with self._lock:
            self.requests += 1
        source = HttpSource(f.url, self._session())
        try:
            announced = source.size_bytes
            if f.size is not None and announced is not None and announced != f.size:
                raise ChecksumError(
                    f"{f.url}: the server announces {announced} bytes, the catalog {f.size}"
                )
            self.store.insert(f, _Watched(source, f.size, self.cancel, count))
        finally:
            with self._lock:
                self._active.pop(threading.get_ident(), None)
            source.close()
