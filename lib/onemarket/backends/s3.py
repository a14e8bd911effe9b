"""The s3 private marketplace: appliances are objects in one bucket of AWS S3 or a compatible
service (Ceph RGW, MinIO...), named ``<APP_PREFIX or "marketapp">-<app id>``.

Import first claims the key (an empty placeholder stored with ``If-None-Match: *``, see
``_claim``), then copies the source once, sequentially, with ``copy_stream`` (which computes
the whole-stream MD5, the one MD5 pass: what oned stores) into an :class:`S3Upload`, the
transfer layer's sink protocol. A source smaller than one part goes up in a single PUT; a
larger one as a multipart upload: the sink fills part buffers and a small pool of threads
sends them, so reading, hashing and sending overlap and memory is bounded by the (reused)
part buffers, whatever the image size (PART_MEMORY_BUDGET_BYTES).
Every body is a SigV4 signed payload: the server checks each part against the SHA-256 in the
signed ``x-amz-content-sha256`` header and refuses a corrupted one, which costs one SHA-256 pass
(fast with the CPU's SHA extensions) instead of a second MD5 for Content-MD5. Any failure
(source, network, server, checksum, timeout, SIGTERM/SIGHUP) aborts the multipart upload and
leaves nothing under the key.

Checksum metadata on multipart objects: S3 metadata is fixed when the upload is created, before
the first byte is read, but the md5 of the whole stream is only known after the last one. So
the object is first completed without it, checked (its multipart ETag must be the MD5 of the
part ETags the server answered, and our MD5 must match the export's), and then copied onto
itself server-side with ``MetadataDirective=REPLACE``, which rewrites metadata without moving
data through us (RGW and S3 copy within the bucket; objects over 5 GiB, beyond CopyObject's
limit, are copied with UploadPartCopy). A copy guarded by ``CopySourceIfMatch`` cannot pick up
anybody else's object. If that step fails, the object is deleted: no object ever exists under
the key without its checksum once the import has returned. (Objects of earlier versions also
carry a ``sha256``; the downloader checks it when present.)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3

from .. import driverlog, s3config
from ..action import App, Market
from ..errors import (
    ChecksumError,
    MarketError,
    SourceError,
    StorageError,
    UnsafePathError,
)
from ..location import S3Location
from ..progress import Progress
from ..s3config import (
    METADATA_IMPORTING,
    METADATA_MD5,
    S3Settings,
    client_error_code,
    is_missing,
    is_precondition_failed,
    make_client,
    s3_error,
)
from ..transfer.hashing import Digests, Expected
from ..transfer.interrupt import interruptible, signals_to_main_thread
from ..transfer.sources import Source, open_source
from ..transfer.streamcopy import copy_stream, write_zeros
from ..units import MIB, mb_bytes, parse_int, size_mb
from .attributes import Attr, count, read
from .base import (
    Backend,
    Check,
    Context,
    ImportRequest,
    ImportResult,
    MonitorResult,
    app_size_mb,
)

DEFAULT_PART_SIZE_MB = 16
"""Part size when READ_LENGTH is not set: the largest that lets PARTS_IN_MEMORY parts fit the
memory budget (upstream reads 32 MB parts one at a time)."""
MIN_PART_SIZE_MB = 5
"""S3's smallest part (all but the last)."""
MAX_PART_BYTES = 5 << 30
"""S3's largest part."""
MAX_PARTS = 10_000
"""S3's most parts per upload: the part size grows so a known size always fits."""
UPLOAD_WORKERS = 4
"""Parts sent at the same time. Each holds one part in memory while it is sent."""
PARTS_IN_MEMORY = UPLOAD_WORKERS + 1
"""Parts held at once: one per worker plus the one being read (5 x 16 MiB = 80 MiB with the
defaults), fewer when they would not fit PART_MEMORY_BUDGET_BYTES."""
PART_MEMORY_BUDGET_BYTES = 80 * MIB
"""Most bytes of part buffers held at once, the import's memory budget (with the ~60 MB of the
interpreter, boto3 and the S3 model, a peak RSS under 150 MB). Larger parts (a big READ_LENGTH,
or parts grown for a long stream of unknown size) mean fewer sent at the same time, down to one
being sent while the next is read (2 x part size, which only exceeds this for parts over
40 MiB): the budget holds whatever READ_LENGTH says, except that floor."""
GROWTH_FROM_PART = 4_000
"""With no size known in advance, parts keep the planned size up to this part number, then
double every GROWTH_STEP_PARTS parts (memory grows with them), so any stream fits 10,000 parts."""
GROWTH_STEP_PARTS = 500
MAX_COPY_BYTES = 5 << 30
"""Largest object CopyObject accepts; larger ones are copied part by part."""
COPY_PART_BYTES = 1 << 30
"""Part size of a server-side multipart copy (no data goes through us, so no memory cost)."""
CHECK_CLIENT_OPTIONS = {"connect_timeout_s": 5.0, "read_timeout_s": 20.0, "max_attempts": 2}
"""``one-market check`` answers within seconds: short timeouts, one retry."""
CLAIM_TOKEN_BYTES = 8
"""Random bytes naming one import's placeholder (16 hex digits)."""
COPY_BUFFERS = 2
"""Read buffers of a local file's copy into the part buffers (2 x 4 MiB): MD5 sets the pace,
not the read, and the part buffers already absorb the network's jitter."""
SLOT_POLL_S = 0.2
"""How often the reader checks for a failed part while waiting for a free slot."""
ABORT_ATTEMPTS = 3
"""Tries to abort a multipart upload (each with botocore's own retries) before leaving it to
the next monitor, which aborts uploads older than STALE_UPLOAD_AGE_S."""
ABORT_RETRY_WAIT_S = 1.0
STALE_UPLOAD_AGE_S = 24 * 3600
"""Multipart uploads under our prefix older than this are leftovers of a crash: monitor aborts
them. (An import running longer than a day would lose its upload.)"""
DEFAULT_TOTAL_MB = 1_048_576
DEFAULT_PREFIX = "marketapp"
USAGE_HEADER = "x-rgw-bytes-used"
"""Ceph RGW reports the bucket's bytes in its HEAD answer: no listing needed."""
CONTENT_TYPE = "application/octet-stream"


def _read_length(text: str) -> int:
    try:
        value = math.ceil(float(text))
    except (ValueError, OverflowError):
        raise ValueError(f"must be a number of MB, not {text[:40]!r}") from None
    if value < MIN_PART_SIZE_MB:
        driverlog.info(
            f"READ_LENGTH {text} MB is below S3's minimum part size: using {MIN_PART_SIZE_MB}"
        )
    return max(value, MIN_PART_SIZE_MB)


def _app_prefix(text: str) -> str:
    if "/" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(
            f"{text!r} must be a non-empty name without '/' (the datastore downloader reads "
            "keys as a file name)"
        )
    return text


OWN_ATTRIBUTES = (
    Attr("READ_LENGTH", "multipart part size in MB (at least 5)", str(DEFAULT_PART_SIZE_MB),
         parse=_read_length),
    Attr("TOTAL_MB", "capacity reported to oned", str(DEFAULT_TOTAL_MB), parse=count),
    Attr("APP_PREFIX", "object keys are <APP_PREFIX>-<app id>", DEFAULT_PREFIX,
         parse=_app_prefix),
)  # fmt: skip
"""The s3 backend's own attributes, besides the client's (:data:`s3config.ATTRIBUTES`)."""


def content_md5(hex_md5: str) -> str:
    """The Content-MD5 header value (base64 of the raw digest) for a hex MD5."""
    return base64.b64encode(bytes.fromhex(hex_md5)).decode("ascii")


def plan_part_size(read_length_mb: int, expected_bytes: int | None) -> int:
    """Part size in bytes: READ_LENGTH (at least 5 MiB), grown so ``expected_bytes`` fits in
    MAX_PARTS parts, rounded to whole MiB."""
    part = max(read_length_mb, MIN_PART_SIZE_MB) * MIB
    if expected_bytes:
        needed = math.ceil(expected_bytes / MAX_PARTS)
        part = max(part, math.ceil(needed / MIB) * MIB)
    return min(part, MAX_PART_BYTES)


def part_size_for(number: int, base: int, exact_size: bool) -> int:
    """Size of part ``number`` (1-based): constant for a known size, growing late otherwise."""
    if exact_size or number <= GROWTH_FROM_PART:
        return base
    doublings = (number - GROWTH_FROM_PART - 1) // GROWTH_STEP_PARTS + 1
    return min(base << doublings, MAX_PART_BYTES)


def buffers_for(part_bytes: int, workers: int) -> int:
    """Part buffers allowed at once for parts of ``part_bytes``: one per worker plus the one
    being read, fewer when that would pass PART_MEMORY_BUDGET_BYTES, never under two."""
    return max(2, min(workers + 1, PART_MEMORY_BUDGET_BYTES // max(part_bytes, 1)))


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a completed multipart object: MD5 of the part MD5s, dash, count."""
    joined = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(part_md5s)}"


def _part_etag(answer: dict[str, Any], number: int) -> str:
    """The hex ETag (the server's MD5 of the part) an UploadPart answer carries."""
    etag = str(answer.get("ETag", "")).strip('"').lower()
    if len(etag) != 32 or any(c not in "0123456789abcdef" for c in etag):
        raise ChecksumError(f"part {number}: the server answered an ETag {etag[:80]!r}, not an MD5")
    return etag


@dataclass(frozen=True)
class _PartPlan:
    """The part-size policy of one upload (pure, as s3transfer's ChunksizeAdjuster)."""

    base: int
    exact: bool

    def size(self, number: int) -> int:
        return part_size_for(number, self.base, self.exact)


class _PartSender:
    """Back-pressure as one object (as s3transfer's BoundedExecutor): each part goes to one
    of ``workers`` sending threads; at most :func:`buffers_for` part buffers exist at once,
    reused (large buffers freed and re-allocated per part fragment the heap across threads
    and let the RSS creep up), and :meth:`buffer` waits for a free one, collecting finished
    parts meanwhile. :meth:`stop` cancels what is queued and refuses more."""

    def __init__(
        self,
        workers: int,
        part_size: int,
        send: Callable[[int, bytearray], str],
        on_sent: Callable[[int], None],
        error: Callable[[BaseException, int], MarketError],
    ) -> None:
        self._workers = workers
        self._slots = buffers_for(part_size, workers)
        self._room = threading.Semaphore(self._slots - 1)  # the first part is filled already
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._send, self._on_sent, self._error = send, on_sent, error
        self._stop = threading.Event()
        self._etags: dict[int, str] = {}
        self._pending: dict[Future[tuple[int, str]], int] = {}
        self._inflight: list[Future[Any]] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-part")

    def buffer(self, size: int) -> bytearray | None:
        """Wait for room for a part of ``size`` bytes: a free buffer, or None for a new one.
        Larger parts (grown late in a stream of unknown size) give up slots for good."""
        while self._slots > buffers_for(size, self._workers):
            self._wait_for_room()
            self._slots -= 1
            with self._lock:
                if self._free:
                    self._free.pop()
        self._wait_for_room()
        with self._lock:
            return self._free.pop() if self._free else None

    def submit(self, number: int, body: bytearray) -> None:
        def done(_future: Future[Any]) -> None:
            with self._lock:
                self._free.append(body)
            self._room.release()

        with self._lock:  # not while stop() cancels: it sees every part that may be sent
            if self._stop.is_set():
                raise StorageError("cancelled")
            with signals_to_main_thread():  # the pool may start a thread here
                upload = self._pool.submit(self._send_one, number, body)
            # a done future keeps its callbacks, and ``done`` holds its buffer: drop them, or
            # buffers given up when parts grow would stay alive to the end
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(upload)
        upload.add_done_callback(done)
        self._pending[upload] = number
        self._collect(block=False)

    def finish(self) -> list[str]:
        """Wait for every part; their ETags in part order."""
        while self._pending:
            self._collect(block=True)
        self._pool.shutdown(wait=True)
        return [self._etags[n] for n in sorted(self._etags)]

    def stop(self) -> list[Future[Any]]:
        """Cancel the queued parts and refuse more; the parts that may still be sent."""
        with self._lock:
            self._stop.set()
            inflight = list(self._inflight)
        self._pool.shutdown(wait=False, cancel_futures=True)  # runs their callbacks: unlocked
        return [f for f in inflight if not f.done()]

    def _wait_for_room(self) -> None:
        """Take a slot, collecting finished parts (a failed one raises) while none is free."""
        while not self._room.acquire(timeout=SLOT_POLL_S):
            if self._stop.is_set():
                raise StorageError("cancelled")
            self._collect(block=False)

    def _send_one(self, number: int, body: bytearray) -> tuple[int, str]:
        if self._stop.is_set():
            raise StorageError("cancelled")
        return len(body), self._send(number, body)

    def _collect(self, block: bool) -> None:
        if not self._pending:
            return
        done, _ = wait(
            list(self._pending), timeout=None if block else 0, return_when=FIRST_COMPLETED
        )
        for fut in done:
            number = self._pending.pop(fut)
            exc = fut.exception()
            if exc is not None:
                raise self._error(exc, number) from None
            sent, etag = fut.result()
            self._etags[number] = etag
            self._on_sent(sent)


class S3Upload:
    """The s3 sink (the :class:`~onemarket.transfer.sinks.Sink` protocol of the local and
    remote atomic files): :meth:`write` fills the part buffer and hands each full one to a
    :class:`_PartSender`, which bounds them; :meth:`commit` stores the object, in one PUT
    when it all fit the first buffer, else by completing the multipart upload, checked
    against the server's ETag; :meth:`abort` (any thread, any time, twice) leaves nothing.
    The multipart upload is created with the first full part and its abort registered right
    there (as s3transfer's ``CreateMultipartUploadTask._main``)."""

    def __init__(
        self,
        backend: S3Backend,
        key: str,
        plan: _PartPlan,
        first_bytes: int,
        digests: Digests,
        progress: Progress,
        announce: str = "",
    ) -> None:
        self._backend, self.key, self.uri = backend, key, backend.uri(key)
        self._plan, self._digests, self._progress = plan, digests, progress
        self._announce = announce
        """What is read (its description), logged when the multipart upload starts; "": no log."""
        self._number = 1
        self._buf = self._part_buffer(first_bytes)
        self._filled = 0
        self._sender: _PartSender | None = None
        self._upload_id = ""
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def _part_buffer(self, size: int, free: bytearray | None = None) -> bytearray:
        """``free`` (a sent part's buffer) when it has the size, else a new one."""
        return free if free is not None and len(free) == size else bytearray(size)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._filled == len(self._buf):
                self._hand_over()
            room = min(len(self._buf) - self._filled, len(view))
            with memoryview(self._buf) as part:  # one memcpy (a bytearray slice copies twice)
                part[self._filled : self._filled + room] = view[:room]
            self._filled += room
            view = view[room:]

    def skip(self, count: int) -> None:
        write_zeros(self.write, count)

    def _hand_over(self) -> None:
        """Send the full part, then wait for room for the next one."""
        sender = self._sender or self._start()
        sender.submit(self._number, self._buf)
        self._number += 1
        if self._number > MAX_PARTS:
            raise SourceError(f"import to {self.uri}: more than {MAX_PARTS} parts needed")
        size = self._plan.size(self._number)
        self._buf, self._filled = self._part_buffer(size, sender.buffer(size)), 0

    def _start(self) -> _PartSender:
        backend, key = self._backend, self.key
        if self._stopped.is_set():  # aborted while the writer was still mid-chunk
            raise StorageError("cancelled")
        try:
            upload_id = backend.client.create_multipart_upload(
                Bucket=backend.bucket, Key=key, ContentType=CONTENT_TYPE
            )["UploadId"]
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            raise backend._error(exc, f"start of multipart upload to {self.uri}") from None
        workers = max(backend.upload_workers, 1)
        sender = _PartSender(
            workers,
            self._plan.base,
            send=lambda number, body: backend._upload_part(key, upload_id, number, body),
            on_sent=self._progress.update,
            error=lambda exc, number: backend._error(exc, f"upload of part {number} of {self.uri}"),
        )
        with self._lock:
            self._upload_id, self._sender = upload_id, sender
        if self._stopped.is_set():  # aborted from another thread meanwhile
            self.abort()
            raise StorageError("cancelled")
        if self._announce:
            driverlog.info(
                f"uploading {self._announce} to {self.uri} in parts of {self._plan.base // MIB} "
                f"MiB, {buffers_for(self._plan.base, workers) - 1} at a time"
            )
        return sender

    def commit(self) -> None:
        """Store what was written, with its checksum (``digests``, complete and verified)."""
        backend, key, uri = self._backend, self.key, self.uri
        del self._buf[self._filled :]
        if self._sender is None:
            try:
                backend.data_client.put_object(
                    Bucket=backend.bucket,
                    Key=key,
                    Body=self._buf,
                    ContentLength=len(self._buf),
                    ContentMD5=content_md5(self._digests.md5),  # the whole object's, known
                    ContentType=CONTENT_TYPE,
                    Metadata=backend._metadata(self._digests),
                )
            except Exception as exc:  # noqa: BLE001 - mapped to one line; the caller cleans up
                raise backend._error(exc, f"upload of {uri}") from None
            self._progress.update(len(self._buf))
            return
        self._sender.submit(self._number, self._buf)
        part_etags = self._sender.finish()
        wanted = multipart_etag([bytes.fromhex(e) for e in part_etags])
        try:
            try:
                answer = backend.client.complete_multipart_upload(
                    Bucket=backend.bucket,
                    Key=key,
                    UploadId=self._upload_id,
                    MultipartUpload={
                        "Parts": [
                            {"PartNumber": n, "ETag": f'"{etag}"'}
                            for n, etag in enumerate(part_etags, start=1)
                        ]
                    },
                )
            except Exception as exc:  # noqa: BLE001 - mapped to one line; the caller aborts
                raise backend._error(exc, f"completion of multipart upload to {uri}") from None
            with self._lock:
                self._upload_id = ""  # completed: no upload left to abort
            etag = str(answer.get("ETag", "")).strip('"') or backend._etag_of(key, uri)
            if etag != wanted:
                backend._delete_quietly(key)  # assembled wrongly: ours, but not what was sent
                raise ChecksumError(f"{uri}: server assembled ETag {etag}, expected {wanted}")
            backend._set_metadata(key, uri, etag, self._digests)
        except BaseException:
            # stored but not verified (a signal during or right after the completion, a failed
            # metadata copy): never left, for the mirror's put_file as for an import
            backend._delete_if_etag(key, wanted)
            raise

    def abort(self) -> None:
        """Abort at once (a SIGTERM'd import should not wait for parts in flight first), let
        the parts in flight end (bounded by the client's timeouts), and abort once more if one
        of them still got stored: S3 may keep a part that was being received during an abort.
        """
        self._stopped.set()
        with self._lock:
            upload_id, self._upload_id = self._upload_id, ""
            sender = self._sender
        running = sender.stop() if sender is not None else []
        if not upload_id:
            return
        self._backend._abort(self.key, upload_id)
        if not running:
            return
        wait(running)
        if any(not f.cancelled() and f.exception() is None for f in running):
            self._backend._abort(self.key, upload_id)


class S3Backend(Backend):
    driver = "s3"
    upload_workers: int = UPLOAD_WORKERS
    stale_upload_age_s: float = STALE_UPLOAD_AGE_S
    use_usage_header: bool = True
    attributes = s3config.ATTRIBUTES + OWN_ATTRIBUTES

    def __init__(self, market: Market, context: Context) -> None:
        super().__init__(market, context)
        self.settings = S3Settings.from_market(market)
        own = read(market, OWN_ATTRIBUTES)
        self.read_length_mb: int = own["READ_LENGTH"]
        self.total_mb: int = own["TOTAL_MB"]
        self.prefix: str = own["APP_PREFIX"]
        self.bucket = self.settings.bucket
        self.client_options: dict[str, float | int] = {}
        """botocore overrides (timeouts, attempts) passed to :func:`make_client`; tests set them."""
        self._session = boto3.session.Session()
        self._client: Any = None
        self._data_client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.settings, self._session, **self.client_options)
        return self._client

    @property
    def data_client(self) -> Any:
        """The client for object bodies (PutObject, UploadPart). Every body is sent as a SigV4
        signed payload: its SHA-256 is in the signed ``x-amz-content-sha256`` header and the
        server refuses a body that does not match it (XAmzContentSHA256Mismatch, checked on
        Ceph RGW Pacific). That is the per-part integrity check, and SHA-256 (0.6-0.8 s/GiB
        with the CPU's SHA extensions, in the upload threads) costs less than a second MD5
        pass for Content-MD5 (1.4-1.9 s/GiB) on top of the whole-object MD5."""
        if self._data_client is None:
            self._data_client = make_client(
                self.settings, self._session, sign_payload=True, **self.client_options
            )
        return self._data_client

    def key_for(self, app: App) -> str:
        if app.id < 0:
            raise StorageError(f"app '{app.name}' has no id: cannot name its object")
        return f"{self.prefix}-{app.id}"

    def uri(self, key: str) -> str:
        return S3Location(self.bucket, key).url

    def _error(self, exc: BaseException, what: str) -> MarketError:
        return s3_error(self._explain(exc), what, self.settings.where)

    def _explain(self, exc: BaseException) -> BaseException:
        """A HEAD answer has no body, so a 403 does not say whether the credentials are wrong
        or the bucket is not ours: ask once more with a request whose error has a body."""
        if client_error_code(exc) != "403":
            return exc
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except Exception as probe:  # noqa: BLE001 - only used to pick the better message
            if client_error_code(probe) not in ("", "403"):
                return probe
        return exc

    # ---- import ------------------------------------------------------------------------------

    def import_app(self, request: ImportRequest) -> ImportResult:
        app, info = request.app, request.source
        key = self.key_for(app)
        uri = self.uri(key)
        what = f"import of app {app.id} to {uri}"
        with interruptible(what):
            claimed = False
            try:
                self._ensure_bucket()
                self._claim(key, uri)
                claimed = True
                with open_source(info.source, self.context.installation) as src:
                    progress = Progress(src.size_bytes, self.context.progress)
                    expected = mb_bytes(info.size_mb) or None
                    digests = self._store(
                        src, key, what, request.expected_md5, expected, progress, True
                    )
                    progress.finish()
                info = request.exported()
            except BaseException:
                # From the claim on, the key is ours alone: whatever is under it (the
                # placeholder, a stored object whose import was interrupted at the very end)
                # goes, or nothing would ever delete it.
                if claimed:
                    self._delete_quietly(key)
                raise
        return ImportResult(
            source=uri,
            md5=digests.md5,
            size_mb=app_size_mb(info, digests.size_bytes),
            format=info.format or app.format or "raw",
            sha256=digests.sha256,
        )

    def put_file(self, key: str, path: str, md5: str = "") -> str:
        """Store the local file ``path`` at ``key`` (a full key, '/' allowed), replacing what
        is there, with the import's verified upload: signed payloads, the MD5 of what was read
        checked against ``md5`` when given and against the server's (multipart) ETag. No key
        claim: for callers that own their keys (the mirror). S3 swaps an object only once it is
        complete, so an upload failed or interrupted before completion leaves the previous
        object; one that completed but fails its check is deleted. Returns the MD5.
        """
        what = f"upload of {path} to {self.uri(key)}"
        with open_source(path, self.context.installation) as src:
            digests = self._store(src, key, what, md5, None, Progress(src.size_bytes, None), False)
        return digests.md5

    def _ensure_bucket(self) -> bool:
        """Make the bucket when it is missing; True when it was made."""
        what = f"bucket '{self.bucket}' of marketplace '{self.market.name}'"
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            if not is_missing(exc):
                raise self._error(exc, what) from None
        driverlog.info(f"creating {what}")
        params: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.aws and self.settings.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            self.client.create_bucket(**params)
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            code = client_error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return False
            if code == "BucketAlreadyExists":
                raise StorageError(
                    f"{what} does not exist and its name is taken by another account"
                ) from None
            if code in ("AccessDenied", "TooManyBuckets", "403"):
                raise StorageError(
                    f"{what} does not exist and these credentials may not create it ({code})"
                ) from None
            raise self._error(exc, f"creation of {what}") from None
        return True

    def _claim(self, key: str, uri: str) -> None:
        """Make the key ours before any byte is sent: an empty placeholder stored with
        ``If-None-Match: *``, which the server refuses (412) when any object is there, so of
        two imports naming one key exactly one goes on (a HEAD first, as upstream does, lets
        both through). The upload then replaces our own placeholder; a failed import deletes
        it. Ceph RGW (checked from Pacific on), AWS S3 and MinIO honour the condition.

        The placeholder carries a token of this import: when botocore retries the PUT after an
        answer was lost, the retry's 412 is about our own placeholder, which HEAD recognises."""
        token = secrets.token_hex(CLAIM_TOKEN_BYTES)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=b"",
                IfNoneMatch="*",
                ContentType=CONTENT_TYPE,
                Metadata={METADATA_IMPORTING: token},
            )
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            if is_precondition_failed(exc):
                if self._claimed_by(key, token):
                    return
                raise StorageError(
                    f"an object already exists at {uri} (an earlier or concurrent import of "
                    "this app): delete the old app (or the object) first"
                ) from None
            raise self._error(exc, f"check of {uri}") from None

    def _claimed_by(self, key: str, token: str) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception:  # noqa: BLE001 - not ours if it cannot be told
            return False
        mine = head.get("Metadata", {}).get(METADATA_IMPORTING) == token
        return mine and head.get("ContentLength") == 0

    def _metadata(self, digests: Digests) -> dict[str, str]:
        return {METADATA_MD5: digests.md5}

    def _store(
        self,
        src: Source,
        key: str,
        what: str,
        expected_md5: Expected,
        expected_bytes: int | None,
        progress: Progress,
        announce: bool,
    ) -> Digests:
        """Copy ``src`` into an :class:`S3Upload` of ``key``, check its MD5, commit it;
        ``expected_bytes`` sizes the parts of a source of unknown size."""
        exact = src.size_bytes is not None
        part_size = plan_part_size(self.read_length_mb, src.size_bytes if exact else expected_bytes)
        # a source known to be smaller than a part fills a buffer of its size (plus the byte
        # that would show it grew), not a whole part
        first = min(part_size, src.size_bytes + 1) if exact else part_size
        digests = Digests(sha256=False)
        sink = S3Upload(
            self, key, _PartPlan(part_size, exact), first, digests, progress,
            src.description if announce else "",
        )  # fmt: skip
        try:
            copy_stream(src, sink, digests=digests, file_buffers=COPY_BUFFERS)
            digests.verify_md5(expected_md5, what)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        return digests

    def _upload_part(self, key: str, upload_id: str, number: int, body: bytearray) -> str:
        extra: dict[str, str] = {}
        if self.settings.signature_version == "s3":
            # SigV2 signs no payload: the part's Content-MD5 is then what the server checks (a
            # second MD5 pass, paid only on legacy gateways)
            extra["ContentMD5"] = content_md5(hashlib.md5(body, usedforsecurity=False).hexdigest())
        answer = self.data_client.upload_part(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ContentLength=len(body),
            **extra,
        )
        return _part_etag(answer, number)

    def _etag_of(self, key: str, uri: str) -> str:
        """ETag of an object (Ceph RGW 16 answers CompleteMultipartUpload with an empty one)."""
        try:
            return str(self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]).strip('"')
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise self._error(exc, f"check of {uri}") from None

    def _set_metadata(self, key: str, uri: str, etag: str, digests: Digests) -> None:
        """Copy the completed object onto itself with its checksums as metadata."""
        source = {"Bucket": self.bucket, "Key": key}
        meta = self._metadata(digests)
        if digests.size_bytes <= MAX_COPY_BYTES:
            try:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource=source,
                    CopySourceIfMatch=f'"{etag}"',
                    Metadata=meta,
                    MetadataDirective="REPLACE",
                    ContentType=CONTENT_TYPE,
                )
            except Exception as exc:  # noqa: BLE001 - mapped to one line
                raise self._error(exc, f"setting checksum metadata on {uri}") from None
            return
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=CONTENT_TYPE, Metadata=meta
            )["UploadId"]
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise self._error(exc, f"setting checksum metadata on {uri}") from None
        try:
            parts = []
            offset, number = 0, 1
            while offset < digests.size_bytes:
                end = min(offset + COPY_PART_BYTES, digests.size_bytes) - 1
                answer = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceIfMatch=f'"{etag}"',
                    CopySourceRange=f"bytes={offset}-{end}",
                )
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
                offset, number = end + 1, number + 1
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            self._abort(key, upload_id)
            raise self._error(exc, f"setting checksum metadata on {uri}") from None

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload (its parts are freed); a WARN if the server cannot be told."""
        last: BaseException | None = None
        for attempt in range(ABORT_ATTEMPTS):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                return
            except Exception as exc:  # noqa: BLE001 - reported below, the import already failed
                if is_missing(exc):
                    return
                last = exc
                if attempt + 1 < ABORT_ATTEMPTS:
                    time.sleep(ABORT_RETRY_WAIT_S)
        reason = self._error(last, "abort") if last else ""
        driverlog.warn(
            f"could not abort the multipart upload of {self.uri(key)} ({reason}); the marketplace "
            f"monitor aborts it once it is {self.stale_upload_age_s / 3600:g} h old"
        )

    def _delete_if_etag(self, key: str, etag: str) -> None:
        """Delete ``key`` if it holds the object with ``etag`` (what this upload assembled),
        never a previous object that the completion did not replace."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception:  # noqa: BLE001 - missing, or not to be told: nothing of ours to delete
            return
        if str(head.get("ETag", "")).strip('"') == etag:
            self._delete_quietly(key)

    def _delete_quietly(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - reported, the import already failed
            driverlog.warn(f"could not remove {self.uri(key)}: {self._error(exc, 'delete')}")

    def _remove_placeholder(self, key: str) -> bool:
        """Delete the stale claim of a killed import (an empty object marked as importing, as
        old as a stale upload), which would otherwise stay; anything else, a newer import's
        claim too, is left alone. True when it was deleted."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            stored = head.get("LastModified")
            age_s = (datetime.now(UTC) - stored).total_seconds() if stored else 0.0
            marked = METADATA_IMPORTING in head.get("Metadata", {})
            claim = head.get("ContentLength") == 0 and marked
            if claim and age_s >= self.stale_upload_age_s:  # a fresh one: a running import's
                self.client.delete_object(Bucket=self.bucket, Key=key)
                return True
        except Exception as exc:  # noqa: BLE001 - best effort, monitor goes on
            if not is_missing(exc):
                driverlog.warn(f"could not check {self.uri(key)}: {self._error(exc, 'check')}")
        return False

    # ---- check -------------------------------------------------------------------------------

    def check(self) -> Iterator[Check]:
        """Credentials, the bucket (made when missing, as imports do) and a multipart upload
        created and aborted under the app prefix (so the monitor's clean-up covers it)."""
        self.client_options = {**CHECK_CLIENT_OPTIONS, **self.client_options}
        self._client = None
        where = self.settings.where
        try:
            self.client.list_buckets()
            yield Check("credentials", True, f"accepted by {where}")
        except Exception as exc:  # noqa: BLE001 - classified below
            if client_error_code(exc) not in {"AccessDenied", "403"}:
                yield Check("credentials", False, str(s3_error(exc, "login", where)))
                return
            yield Check("credentials", True, f"accepted by {where} (listing not allowed)")
        try:
            created = self._ensure_bucket()
        except MarketError as exc:
            yield Check("bucket", False, str(exc))
            return
        made = " was missing and has been created (as imports do)" if created else " reachable"
        yield Check("bucket", True, self.bucket + made)
        key = f"{self.prefix}-onemarket-check-{secrets.token_hex(8)}"
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            yield Check(
                "multipart", False, str(self._error(exc, f"multipart upload to {self.uri(key)}"))
            )
            return
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            err = self._error(exc, f"abort of test upload {self.uri(key)}")
            yield Check("multipart", False, f"{err} (monitors abort it after a day)")
            return
        yield Check("multipart", True, "a multipart upload can be created and aborted")

    # ---- delete ------------------------------------------------------------------------------

    def delete_app(self, app: App) -> bool:
        source = app.source.strip()
        try:
            loc = S3Location.parse(source)
        except UnsafePathError as exc:
            raise UnsafePathError(f"app {app.id}: {exc}") from None
        if loc.bucket != self.bucket:
            raise UnsafePathError(
                f"app {app.id}: SOURCE {source[:200]!r} is outside the marketplace's bucket "
                f"'{self.bucket}': refused"
            )
        key = loc.key
        if "/" in key or key in (".", ".."):
            raise UnsafePathError(
                f"app {app.id}: SOURCE {source[:200]!r} does not name an object of the "
                "marketplace (a key without '/'): refused"
            )
        uri = self.uri(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - mapped below
            if is_missing(exc):
                driverlog.warn(f"{uri} does not exist: nothing to delete")
                return False
            raise self._error(exc, f"delete of {uri}") from None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - mapped below
            raise self._error(exc, f"delete of {uri}") from None
        driverlog.info(f"deleted {uri}")
        return True

    # ---- monitor -----------------------------------------------------------------------------

    def monitor(self) -> MonitorResult:
        total_mb = self.total_mb
        used_bytes = self.used_bytes()
        if used_bytes is None:
            return MonitorResult(used_mb=0, free_mb=total_mb, total_mb=total_mb)
        self.abort_stale_uploads()
        self.remove_stale_claims()
        used_mb = size_mb(used_bytes)
        return MonitorResult(used_mb=used_mb, free_mb=max(total_mb - used_mb, 0), total_mb=total_mb)

    def used_bytes(self) -> int | None:
        """Bytes stored in the bucket (None when it does not exist yet)."""
        what = f"usage of bucket '{self.bucket}'"
        try:
            answer = self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - mapped below
            if is_missing(exc):
                driverlog.info(f"bucket '{self.bucket}' does not exist yet (made at first import)")
                return None
            raise self._error(exc, what) from None
        headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        reported = str(headers.get(USAGE_HEADER, "")).strip()
        if self.use_usage_header:
            with contextlib.suppress(ValueError):  # a header that is no count: list instead
                used = parse_int(reported)
                if used >= 0:
                    return used
        total = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for page in pages:
                total += sum(int(obj.get("Size", 0)) for obj in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001 - mapped below
            raise self._error(exc, what) from None
        return total

    def _stale(self, listing: str, items: str, stamp: str) -> Iterator[dict[str, Any]]:
        """The entries of ``listing`` under our prefix whose ``stamp`` is older than
        ``stale_upload_age_s`` (list errors propagate)."""
        now = datetime.now(UTC)
        pages = self.client.get_paginator(listing).paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}-"
        )
        for page in pages:
            for item in page.get(items, []):
                when = item.get(stamp)
                age_s = (now - when).total_seconds() if isinstance(when, datetime) else -1.0
                if age_s >= self.stale_upload_age_s:
                    yield item

    def remove_stale_claims(self) -> int:
        """Delete the empty claims of imports killed before any upload was open (a SIGKILL
        during a single PUT) once stale: nothing else would. One listing of our keys per
        monitor (a request per 1,000 apps); failures are WARN lines."""
        removed = 0
        try:
            for obj in self._stale("list_objects_v2", "Contents", "LastModified"):
                key = str(obj.get("Key", ""))
                if obj.get("Size") == 0 and self._remove_placeholder(key):
                    removed += 1
                    driverlog.info(f"removed {self.uri(key)}, the claim of a killed import")
        except Exception as exc:  # noqa: BLE001 - the usage is still worth reporting
            driverlog.warn(f"could not list the bucket's objects: {self._error(exc, 'list')}")
        return removed

    def abort_stale_uploads(self) -> int:
        """Abort multipart uploads under our prefix older than ``stale_upload_age_s`` (crash
        leftovers: their parts take space and cost money). Failures are WARN lines."""
        aborted = 0
        try:
            for upload in self._stale("list_multipart_uploads", "Uploads", "Initiated"):
                key = str(upload.get("Key", ""))
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                    )
                except Exception as exc:  # noqa: BLE001 - one WARN, keep going
                    driverlog.warn(
                        f"could not abort stale upload of {self.uri(key)}: "
                        f"{self._error(exc, 'abort')}"
                    )
                    continue
                aborted += 1
                started = upload["Initiated"].isoformat(timespec="seconds")
                driverlog.info(
                    f"aborted multipart upload of {self.uri(key)} started {started} "
                    "(left by a failed import)"
                )
                self._remove_placeholder(key)
        except Exception as exc:  # noqa: BLE001 - the usage is still worth reporting
            driverlog.warn(f"could not list multipart uploads: {self._error(exc, 'list')}")
        return aborted
