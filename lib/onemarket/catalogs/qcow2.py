"""Virtual disk size of a remote qcow2 image, read from its header with one ranged GET.

A KVM app must announce the size of the disk a VM will see (the *virtual* size), not the size
of the compressed file. The qcow2 header carries it in its first 32 bytes, so one small ranged
request is enough. The answer is cached under the image's sha256: a published file never
changes, so each image costs the server one request in its lifetime, and a monitor whose
catalog did not change makes no ranged request at all.

Header layout (big-endian, QEMU's qcow2 specification): magic ``QFI\\xfb`` (4 bytes), version
(4, 2 or 3), backing file offset (8), backing file size (4), cluster bits (4), virtual size (8).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .. import web
from ..errors import RemoteError, StorageError
from ..transfer.interrupt import signals_to_main_thread
from ..transfer.local import (
    PRIVATE_FILE_MODE,
    UNIQUE_PREFIX,
    atomic_file,
    sweep_temps,
    unique_temp,
)

QCOW2_MAGIC = b"QFI\xfb"
HEADER_BYTES = 104
"""Bytes asked for: the whole version 3 header (only the first 32 are needed)."""
RANGE_READ_TIMEOUT_S = 20.0
"""Read timeout of one ranged request; the answer is a hundred bytes."""
RANGED_FETCH_CONCURRENCY = 4
"""Ranged requests in flight at once (threads; a few KB of memory each)."""
MAX_FAILURES_PER_RUN = 8
"""After this many failed ranged requests in one monitor, the remaining images are not tried
(an unreachable server would otherwise cost one timeout per image)."""
MAX_REQUESTS_PER_RUN = 256
"""Ranged requests one monitor makes at most (a real catalog has about a hundred VM images, all
cached after the first run): the others are deferred to the next monitors, so a catalog listing
thousands of new images cannot hold a monitor for thousands of requests."""
CACHE_MAX_ENTRIES = 8192
"""Sizes remembered (about 100 bytes each on disk); the least recently used go first."""
MAX_VIRTUAL_SIZE_BYTES = 1 << 50
"""Sanity bound (1 PiB): a larger value means the header is not what it claims to be."""
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
CACHE_FILE_NAME = "qcow2-virtual-sizes.json"
_HEADER = struct.Struct(">4sIQIIQ")


class Qcow2HeaderError(ValueError):
    """The bytes are not the start of a qcow2 image."""


def parse_virtual_size(header: bytes) -> int:
    """Virtual disk size in bytes from the first bytes of a qcow2 image."""
    if len(header) < _HEADER.size:
        raise Qcow2HeaderError(f"not a qcow2 image (only {len(header)} bytes)")
    magic, version, _backing_off, _backing_len, cluster_bits, size = _HEADER.unpack_from(header)
    if magic != QCOW2_MAGIC:
        raise Qcow2HeaderError("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise Qcow2HeaderError(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2HeaderError(f"invalid qcow2 cluster bits {cluster_bits}")
    if size <= 0 or size > MAX_VIRTUAL_SIZE_BYTES:
        raise Qcow2HeaderError(f"implausible qcow2 virtual size {size}")
    return size


def fetch_virtual_size(session: requests.Session, url: str) -> int:
    """Virtual size of the qcow2 image at ``url``, reading only its header (messages name the
    URL with its password masked)."""
    shown = web.display_url(url)
    headers = {"Range": f"bytes=0-{HEADER_BYTES - 1}", "Accept-Encoding": "identity"}
    try:
        resp = session.get(
            url, headers=headers, stream=True, timeout=(web.CONNECT_TIMEOUT_S, RANGE_READ_TIMEOUT_S)
        )
    except requests.RequestException as exc:
        raise RemoteError(
            f"cannot read the qcow2 header of {shown}: {web.describe_request_error(exc)}"
        ) from None
    try:
        if resp.status_code not in (200, 206):
            raise RemoteError(f"{shown} answered HTTP {resp.status_code} to a ranged request")
        data = b""
        # a server ignoring Range answers 200 with the whole file: stop after the header
        for chunk in resp.iter_content(HEADER_BYTES):
            data += chunk
            if len(data) >= HEADER_BYTES:
                break
    except requests.RequestException as exc:
        raise RemoteError(
            f"reading the qcow2 header of {shown} failed: {web.describe_request_error(exc)}"
        ) from None
    finally:
        resp.close()
    try:
        return parse_virtual_size(data[:HEADER_BYTES])
    except Qcow2HeaderError as exc:
        raise RemoteError(f"{shown}: {exc}") from None


class VirtualSizeCache:
    """sha256 -> virtual size, in one JSON file written atomically (temporary name + rename)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[int]] = {}
        self._dirty = False
        self._load()

    @classmethod
    def in_dir(cls, cache_dir: Path | None) -> VirtualSizeCache:
        return cls(None if cache_dir is None else cache_dir / CACHE_FILE_NAME)

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a missing or damaged cache only costs ranged requests
        entries = doc.get("sizes") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            return
        for sha, value in entries.items():
            if (
                isinstance(sha, str)
                and isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and 0 < value[0] <= MAX_VIRTUAL_SIZE_BYTES
            ):
                self._entries[sha] = value

    def get(self, sha256: str) -> int | None:
        entry = self._entries.get(sha256)
        if entry is None:
            return None
        now = int(time.time())
        if now - entry[1] > 86400:  # refresh the last-use stamp at most daily
            entry[1] = now
            self._dirty = True
        return entry[0]

    def put(self, sha256: str, size: int) -> None:
        self._entries[sha256] = [size, int(time.time())]
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        keep = sorted(self._entries.items(), key=lambda kv: kv[1][1], reverse=True)
        doc = {"sizes": dict(keep[:CACHE_MAX_ENTRIES])}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sweep_temps(self.path.parent, UNIQUE_PREFIX, ".json", max_age_s=web.STALE_TMP_S)
            temp = unique_temp(self.path, suffix=".json")
            with atomic_file(self.path, temp=temp, mode=PRIVATE_FILE_MODE) as f:
                f.write(json.dumps(doc, separators=(",", ":")).encode())
        except (OSError, StorageError):
            return  # not fatal: the sizes are asked again next time
        self._dirty = False


@dataclass
class SizeLookup:
    """Result of :func:`virtual_sizes`: sizes found, one-line failures, requests made."""

    sizes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    not_tried: int = 0
    """Images not tried after :data:`MAX_FAILURES_PER_RUN` failures."""
    deferred: int = 0
    """Images left for the next monitor by :data:`MAX_REQUESTS_PER_RUN`."""


def virtual_sizes(
    session: requests.Session,
    wanted: Mapping[str, str],
    cache: VirtualSizeCache,
    concurrency: int = RANGED_FETCH_CONCURRENCY,
) -> SizeLookup:
    """Virtual sizes for ``{sha256: url}``: from the cache, else by ranged GETs in parallel."""
    out = SizeLookup()
    missing: list[tuple[str, str]] = []
    for sha, url in wanted.items():
        size = cache.get(sha)
        if size is None:
            missing.append((sha, url))
        else:
            out.sizes[sha] = size
    if len(missing) > MAX_REQUESTS_PER_RUN:
        out.deferred = len(missing) - MAX_REQUESTS_PER_RUN
        missing = missing[:MAX_REQUESTS_PER_RUN]
    if not missing:
        cache.save()
        return out

    lock = threading.Lock()
    failed = [0]

    def one(item: tuple[str, str]) -> tuple[str, int | None, str]:
        sha, url = item
        with lock:
            if failed[0] >= MAX_FAILURES_PER_RUN:
                return sha, None, ""
            out.requests += 1
        try:
            return sha, fetch_virtual_size(session, url), ""
        except RemoteError as exc:
            with lock:
                failed[0] += 1
            return sha, None, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        try:
            with signals_to_main_thread():  # map() submits every job, starting the threads
                answers = pool.map(one, missing)
            for sha, size, error in answers:
                if size is not None:
                    out.sizes[sha] = size
                    cache.put(sha, size)
                elif error:
                    out.failures[sha] = error
                else:
                    out.not_tried += 1
        except BaseException:  # a stop signal: the queued fetches are dropped, not waited for
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    cache.save()
    return out
