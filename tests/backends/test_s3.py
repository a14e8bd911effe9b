"""The s3 backend against a real Ceph RGW on loopback (tests/servers/rgw.py).

Every test uses its own bucket, so tests are independent while sharing one cluster. Faults
are real: a source that stops mid-stream, radosgw killed or frozen while parts are in flight,
a wrong secret, a second RGW user without access to the bucket, a closed port.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import boto3
import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from onemarket import driverlog, s3config
from onemarket.action import App, ImportInfo, Market
from onemarket.backends import s3 as s3mod
from onemarket.backends.base import Context, ImportRequest, ImportResult
from onemarket.backends.s3 import S3Backend
from onemarket.errors import (
    ActionTimeout,
    ChecksumError,
    ConfigError,
    MarketError,
    RemoteError,
    SourceError,
    StorageError,
    UnsafePathError,
)
from onemarket.installation import Installation
from onemarket.progress import ProgressEvent
from onemarket.s3config import S3Settings, client_config, s3_error
from onemarket.template import parse_template
from onemarket.transfer.interrupt import Interrupted

from tests.payloads import (
    app_xml,
    delete_payload,
    import_info_xml,
    import_payload,
    monitor_payload,
)
from tests.randomdata import write_random
from tests.servers import free_port
from tests.servers.rgw import (
    NOBUCKETS_ACCESS_KEY,
    NOBUCKETS_SECRET_KEY,
    OTHER_ACCESS_KEY,
    OTHER_SECRET_KEY,
    CephRgw,
)

MIB = 1 << 20
WAIT_S = 30.0
"""Bound on waiting for the other thread of a concurrency test."""
REPO = Path(__file__).resolve().parents[2]
_bucket_numbers = itertools.count(1)


# ---- helpers --------------------------------------------------------------------------------


def new_bucket() -> str:
    return f"onemarket-test-{os.getpid()}-{next(_bucket_numbers)}"


def market_attrs(rgw: CephRgw, bucket: str, **extra: str) -> dict[str, str]:
    attrs = {
        "ACCESS_KEY_ID": rgw.access_key,
        "SECRET_ACCESS_KEY": rgw.secret_key,
        "REGION": "us-east-1",
        "BUCKET": bucket,
        "ENDPOINT": rgw.endpoint,
        "FORCE_PATH_STYLE": "YES",
        "AWS": "no",
    }
    attrs.update(extra)
    return attrs


def make_backend(
    attrs: dict[str, str],
    tmp_path: Path,
    progress: Callable[[ProgressEvent], None] | None = None,
    **client_options: float | int,
) -> S3Backend:
    market = Market(id=100, name="s3 test market", driver="s3", attrs=attrs)
    inst = Installation(None, tmp_path / "remotes", tmp_path / "var", tmp_path / "mads")
    backend = S3Backend(market, Context(installation=inst, progress=progress))
    backend.client_options = {"max_attempts": 2, "connect_timeout_s": 3, **client_options}
    return backend


def raw_client(rgw: CephRgw, access_key: str | None = None, secret: str | None = None):
    """A plain boto3 client, independent of the code under test, for checking results."""
    return boto3.client(
        "s3",
        endpoint_url=rgw.endpoint,
        aws_access_key_id=access_key or rgw.access_key,
        aws_secret_access_key=secret or rgw.secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=20,
        ),
    )


def app(app_id: int = 7) -> App:
    return App(id=app_id, name=f"app {app_id}", format="qcow2")


def do_import(
    backend: S3Backend, source: str, md5: str = "", app_id: int = 7, export_size_mb: int = 0
):
    info = ImportInfo(source=source, md5=md5, size_mb=export_size_mb, format="qcow2")
    return backend.import_app(ImportRequest(app=app(app_id), source=info))


def uploads_left(client, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def object_exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return False
        raise
    return True


def pattern_stream(
    total: int, hook_at: int | None = None, hook: Callable[[], None] | None = None, stop_at=None
) -> Callable[[BaseHTTPRequestHandler], None]:
    """An httpd route announcing ``total`` bytes, calling ``hook`` once ``hook_at`` bytes are
    out, and closing the connection at ``stop_at`` bytes when given (a vanishing source)."""

    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        sent, fired = 0, False
        chunk = bytes(range(256)) * 4096
        try:
            while sent < total:
                if stop_at is not None and sent >= stop_at:
                    h.close_connection = True
                    return
                if hook is not None and hook_at is not None and sent >= hook_at and not fired:
                    fired = True
                    hook()
                piece = chunk[: min(len(chunk), total - sent)]
                h.wfile.write(piece)
                sent += len(piece)
        except OSError:
            h.close_connection = True

    return handler


@pytest.fixture
def bucket() -> str:
    return new_bucket()


@pytest.fixture
def s3(rgw: CephRgw) -> Iterator:
    yield raw_client(rgw)


# ---- import ---------------------------------------------------------------------------------


def test_single_put_1mib_roundtrip(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    image = tmp_path / "one.img"
    md5, _ = write_random(image, MIB)
    events: list[ProgressEvent] = []
    backend = make_backend(market_attrs(rgw, bucket), tmp_path, progress=events.append)

    result = do_import(backend, str(image), md5=md5)

    assert result.source == f"s3://{bucket}/marketapp-7"
    assert (result.md5, result.size_mb, result.format) == (md5, 1, "qcow2")
    obj = s3.get_object(Bucket=bucket, Key="marketapp-7")
    assert obj["Body"].read() == image.read_bytes()
    assert obj["Metadata"] == {"md5": md5}
    assert obj["ETag"].strip('"') == md5
    assert events and events[-1].final and events[-1].done_bytes == MIB
    printed = parse_template(result.to_template()).as_dict()
    assert printed == {"SOURCE": result.source, "MD5": md5, "SIZE": "1", "FORMAT": "qcow2"}


def test_size_is_the_image_size_the_export_reports(
    rgw: CephRgw, bucket: str, tmp_path: Path
) -> None:
    """As stock: the export's SIZE (a qcow2's virtual size), not the 1 MiB of the file."""
    image = tmp_path / "disk.qcow2"
    write_random(image, MIB)
    backend = make_backend(market_attrs(rgw, bucket), tmp_path)
    assert do_import(backend, str(image), export_size_mb=256).size_mb == 256


def test_stock_downloader_style_get(rgw: CephRgw, bucket: str, tmp_path: Path) -> None:
    """The datastore downloader splits s3://BUCKET/KEY and GETs ENDPOINT/BUCKET/KEY signed
    with SigV4 (as curl --aws-sigv4 does, plus the content hash header RGW needs)."""
    image = tmp_path / "img"
    write_random(image, 3 * MIB + 5)
    backend = make_backend(market_attrs(rgw, bucket, APP_PREFIX="myapps"), tmp_path)
    result = do_import(backend, f"file://{image}", app_id=42)
    assert result.source == f"s3://{bucket}/myapps-42"

    bucket_name, key = Path(result.source[len("s3://") :]).parent.name, Path(result.source).name
    url = f"{rgw.endpoint}/{bucket_name}/{key}"
    req = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(rgw.access_key, rgw.secret_key), "s3", "us-east-1").add_auth(req)
    got = requests.get(url, headers=dict(req.headers.items()), timeout=30)
    assert got.status_code == 200
    assert got.content == image.read_bytes()


@pytest.mark.slow
def test_multipart_200mib_parallel_roundtrip(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    image = tmp_path / "big.img"
    md5, _ = write_random(image, 200 * MIB)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="8"), tmp_path)
    spy = UploadPartSpy(backend)
    result = do_import(backend, str(image), md5=md5)

    assert (result.md5, result.size_mb) == (md5, 200)
    assert all(kw["ContentLength"] == kw["BodyLength"] for kw in spy.seen)
    assert len(spy.seen) == 25
    assert 2 <= spy.most_at_once() <= s3mod.UPLOAD_WORKERS
    head = s3.head_object(Bucket=bucket, Key="marketapp-7")
    assert head["ContentLength"] == 200 * MIB
    assert head["Metadata"] == {"md5": md5}
    got_md5 = hashlib.md5()
    body = s3.get_object(Bucket=bucket, Key="marketapp-7")["Body"]
    for chunk in iter(lambda: body.read(4 * MIB), b""):
        got_md5.update(chunk)
    assert got_md5.hexdigest() == md5
    assert uploads_left(s3, bucket) == []


def test_existing_object_is_an_error(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    image = tmp_path / "img"
    write_random(image, 1000)
    backend = make_backend(market_attrs(rgw, bucket), tmp_path)
    do_import(backend, str(image))
    s3.put_object(Bucket=bucket, Key="marketapp-7", Body=b"someone else's")
    with pytest.raises(StorageError, match="already exists"):
        do_import(backend, str(image))
    assert s3.get_object(Bucket=bucket, Key="marketapp-7")["Body"].read() == b"someone else's"


def test_claim_retried_after_a_lost_answer_is_still_ours(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path
) -> None:
    """The placeholder PUT succeeds but its answer is lost, so botocore sends it again: the
    retry's 412 is about our own placeholder, and the import goes on."""
    image = tmp_path / "img"
    md5 = write_random(image, 1000)[0]
    backend = make_backend(market_attrs(rgw, bucket), tmp_path)
    real = backend.client.put_object

    def answer_lost(**kwargs):
        if kwargs.get("IfNoneMatch") == "*":
            real(**kwargs)
        return real(**kwargs)

    backend.client.put_object = answer_lost
    assert do_import(backend, str(image)).md5 == md5
    got = s3.get_object(Bucket=bucket, Key="marketapp-7")["Body"].read()
    assert hashlib.md5(got).hexdigest() == md5


@pytest.mark.parametrize("size", [MIB, 12 * MIB], ids=["single", "multipart"])
def test_concurrent_imports_of_one_app_have_one_winner(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, size: int
) -> None:
    """Two imports of app 7 with different images, started together and slowed down once
    past the existence check (where the check-then-upload race was): exactly one succeeds,
    and the object holds the winner's bytes."""
    images = [tmp_path / "a", tmp_path / "b"]
    md5s = [write_random(image, size)[0] for image in images]
    at_start = threading.Barrier(2, timeout=WAIT_S)
    backends = [make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path) for _ in images]
    for b in backends:
        b.client  # noqa: B018 - the clients exist before the race starts
        real = b.data_client.upload_part, b.data_client.put_object

        def slow(real, **kwargs):
            time.sleep(0.5)  # let the other import pass its check too
            return real(**kwargs)

        b.data_client.upload_part = functools.partial(slow, real[0])
        b.data_client.put_object = functools.partial(slow, real[1])

    def run(i: int) -> ImportResult | MarketError:
        at_start.wait()
        try:
            return do_import(backends[i], str(images[i]))
        except MarketError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, range(2)))
    won = [i for i, r in enumerate(outcomes) if isinstance(r, ImportResult)]
    assert len(won) == 1, outcomes
    loser = outcomes[1 - won[0]]
    assert isinstance(loser, StorageError) and "already exists" in str(loser)
    got = hashlib.md5(s3.get_object(Bucket=bucket, Key="marketapp-7")["Body"].read())
    assert got.hexdigest() == md5s[won[0]] == outcomes[won[0]].md5
    assert uploads_left(s3, bucket) == []


@pytest.mark.parametrize("size", [MIB, 12 * MIB], ids=["single", "multipart"])
def test_a_body_corrupted_on_the_way_is_refused_by_the_server(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, size: int
) -> None:
    """Each body is a signed payload: RGW checks it against the signed SHA-256 and refuses
    one changed after signing (a byte flipped on the wire), so no bad part is ever stored."""
    image = tmp_path / "img"
    write_random(image, size)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)

    def flip_last_byte(request, **_kwargs) -> None:
        body = bytearray(request.body)
        body[-1] ^= 0xFF
        request.body = bytes(body)

    for op in ("PutObject", "UploadPart"):
        backend.data_client.meta.events.register(f"before-send.s3.{op}", flip_last_byte)
    with pytest.raises(ChecksumError, match="corrupted"):
        do_import(backend, str(image))
    assert_nothing_left(s3, bucket)


def test_part_size_planning() -> None:
    assert s3mod.plan_part_size(32, None) == 32 * MIB
    assert s3mod.plan_part_size(1, None) == 5 * MIB
    # 1 TiB at 32 MiB would need 32,768 parts: grown to fit 10,000
    size = 1 << 40
    part = s3mod.plan_part_size(32, size)
    assert part % MIB == 0 and -(-size // part) <= s3mod.MAX_PARTS
    # without a known size, parts grow late and any stream up to S3's 5 TiB limit fits
    total = sum(s3mod.part_size_for(n, 5 * MIB, False) for n in range(1, s3mod.MAX_PARTS + 1))
    assert total >= 5 << 40
    assert s3mod.part_size_for(s3mod.MAX_PARTS, 5 * MIB, True) == 5 * MIB


def test_bad_prefix_and_read_length(rgw: CephRgw, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="APP_PREFIX"):
        make_backend(market_attrs(rgw, "bkt", APP_PREFIX="a/b"), tmp_path)
    with pytest.raises(ConfigError, match="READ_LENGTH"):
        make_backend(market_attrs(rgw, "bkt", READ_LENGTH="lots"), tmp_path)


# ---- faults during import -------------------------------------------------------------------


def assert_nothing_left(s3, bucket: str, key: str = "marketapp-7") -> None:
    assert uploads_left(s3, bucket) == []
    assert not object_exists(s3, bucket, key)


@pytest.mark.parametrize("size", [2 * MIB, 12 * MIB], ids=["single", "multipart"])
def test_checksum_mismatch_aborts(rgw: CephRgw, s3, bucket: str, tmp_path: Path, size: int) -> None:
    image = tmp_path / "img"
    write_random(image, size)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    with pytest.raises(ChecksumError, match="MD5 mismatch"):
        do_import(backend, str(image), md5="0" * 32)
    assert_nothing_left(s3, bucket)


def test_source_vanishing_mid_upload(rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path) -> None:
    httpd.routes["/img"] = pattern_stream(64 * MIB, stop_at=23 * MIB)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    with pytest.raises(SourceError):
        do_import(backend, f"{httpd.url}/img")
    assert_nothing_left(s3, bucket)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_mid_upload_aborts(
    rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path, sig: signal.Signals
) -> None:
    """The MAD stops a hung action with SIGTERM, a dropped ssh session sends SIGHUP: the
    handler turns either into a clean abort (no open multipart upload)."""
    pid = os.getpid()
    httpd.routes["/img"] = pattern_stream(
        64 * MIB, hook_at=21 * MIB, hook=lambda: os.kill(pid, sig)
    )
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    with pytest.raises(ActionTimeout, match=sig.name):
        do_import(backend, f"{httpd.url}/img")
    assert_nothing_left(s3, bucket)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_server_read_timeout_aborts(rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path) -> None:
    """radosgw frozen (SIGSTOP) while parts are in flight: the socket timeouts fail the import;
    the gateway comes back when the abort is sent, which must then get through."""
    safety = threading.Timer(60.0, rgw.resume_rgw)
    httpd.routes["/img"] = pattern_stream(40 * MIB)
    backend = make_backend(
        market_attrs(rgw, bucket, READ_LENGTH="5"),
        tmp_path,
        read_timeout_s=1.5,
        connect_timeout_s=1.5,
        max_attempts=1,
    )
    real_abort = backend.client.abort_multipart_upload
    aborts: list[str] = []

    def abort_after_recovery(**kwargs):
        aborts.append(kwargs["UploadId"])
        rgw.resume_rgw()
        return real_abort(**kwargs)

    real_upload_part = backend.data_client.upload_part

    def freeze_at_part_3(**kwargs):
        if kwargs["PartNumber"] == 3:
            rgw.pause_rgw()
        return real_upload_part(**kwargs)

    backend.client.abort_multipart_upload = abort_after_recovery
    backend.data_client.upload_part = freeze_at_part_3
    safety.start()
    try:
        with pytest.raises(ActionTimeout, match="did not answer in time"):
            do_import(backend, f"{httpd.url}/img")
    finally:
        safety.cancel()
        rgw.resume_rgw()
    assert aborts and len(set(aborts)) == 1
    assert_nothing_left(s3, bucket)


@pytest.mark.slow
def test_radosgw_killed_mid_upload_then_monitor_cleans(
    rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # killed once the multipart upload surely exists: the sink trails the read by the copy's
    # queue (a few MiB)
    httpd.routes["/img"] = pattern_stream(48 * MIB, hook_at=32 * MIB, hook=rgw.kill_rgw)
    backend = make_backend(
        market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path, max_attempts=2, read_timeout_s=5
    )
    backend.client  # noqa: B018 - create the client (and its bucket check) while RGW is up
    try:
        with pytest.raises(RemoteError, match=r"cannot reach|failed"):
            do_import(backend, f"{httpd.url}/img")
    finally:
        rgw.start_rgw()
    assert "could not abort the multipart upload" in capsys.readouterr().err
    assert len(uploads_left(s3, bucket)) == 1
    # only the import's empty claim on the key, which it could not delete either
    head = s3.head_object(Bucket=bucket, Key="marketapp-7")
    assert head["ContentLength"] == 0 and "onemarket-importing" in head["Metadata"]

    monitor = make_backend(market_attrs(rgw, bucket), tmp_path)
    monitor.monitor()
    assert len(uploads_left(s3, bucket)) == 1, "a fresh upload may be a running import"
    monitor.stale_upload_age_s = 0
    monitor.monitor()
    assert "aborted multipart upload of s3://" in capsys.readouterr().err
    assert_nothing_left(s3, bucket)


def test_monitor_removes_old_claims_of_killed_imports_only(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An import SIGKILLed during its single PUT leaves its empty claim and no upload: the
    monitor removes it once old; an empty object that is no claim, and a fresh claim, stay."""
    monitor = make_backend(market_attrs(rgw, bucket), tmp_path)
    s3.create_bucket(Bucket=bucket)
    claim = {"onemarket-importing": "0123456789abcdef"}
    s3.put_object(Bucket=bucket, Key="marketapp-9", Body=b"", Metadata=claim)
    s3.put_object(Bucket=bucket, Key="marketapp-10", Body=b"")  # empty, but no claim
    monitor.monitor()
    assert object_exists(s3, bucket, "marketapp-9"), "a fresh claim may be a running import"
    monitor.stale_upload_age_s = 0
    monitor.monitor()
    assert not object_exists(s3, bucket, "marketapp-9")
    assert object_exists(s3, bucket, "marketapp-10")
    assert "marketapp-9, the claim of a killed import" in capsys.readouterr().err


# ---- configuration and permission faults: one line, no secret -------------------------------


def one_clear_line(exc: BaseException, secret: str) -> str:
    text = str(exc)
    assert "\n" not in text and secret not in text and "Traceback" not in text
    return text


def test_wrong_credentials(rgw: CephRgw, bucket: str, tmp_path: Path) -> None:
    secret = "wrongSecretThatMustNeverBePrinted000001"
    attrs = market_attrs(rgw, bucket, SECRET_ACCESS_KEY=secret)
    image = tmp_path / "img"
    write_random(image, 1000)
    backend = make_backend(attrs, tmp_path)
    with pytest.raises(ConfigError) as err:
        do_import(backend, str(image))
    assert "rejected the credentials" in one_clear_line(err.value, secret)
    with pytest.raises(ConfigError) as err:
        backend.monitor()
    one_clear_line(err.value, secret)
    attrs["ACCESS_KEY_ID"] = "NOSUCHKEY00000000000"
    with pytest.raises(ConfigError) as err:
        make_backend(attrs, tmp_path).monitor()
    assert "InvalidAccessKeyId" in one_clear_line(err.value, secret)


def test_wrong_bucket_permissions(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    """A second RGW user, who owns nothing and is granted nothing, uses our bucket."""
    s3.create_bucket(Bucket=bucket)
    key, secret = OTHER_ACCESS_KEY, OTHER_SECRET_KEY
    attrs = market_attrs(rgw, bucket, ACCESS_KEY_ID=key, SECRET_ACCESS_KEY=secret)
    image = tmp_path / "img"
    write_random(image, 1000)
    backend = make_backend(attrs, tmp_path)
    with pytest.raises(StorageError) as err:
        do_import(backend, str(image))
    assert "access denied" in one_clear_line(err.value, secret)
    with pytest.raises(StorageError) as err:
        backend.monitor()
    assert "access denied" in one_clear_line(err.value, secret)
    with pytest.raises(StorageError) as err:
        backend.delete_app(App(id=7, name="a", source=f"s3://{bucket}/marketapp-7"))
    assert "access denied" in one_clear_line(err.value, secret)


def test_bucket_creation_not_permitted(rgw: CephRgw, tmp_path: Path) -> None:
    access, secret = NOBUCKETS_ACCESS_KEY, NOBUCKETS_SECRET_KEY
    attrs = market_attrs(rgw, new_bucket(), ACCESS_KEY_ID=access, SECRET_ACCESS_KEY=secret)
    image = tmp_path / "img"
    write_random(image, 1000)
    with pytest.raises(StorageError) as err:
        do_import(make_backend(attrs, tmp_path), str(image))
    assert "may not create it" in one_clear_line(err.value, secret)


def test_unreachable_endpoint(rgw: CephRgw, tmp_path: Path) -> None:
    attrs = market_attrs(rgw, "bkt-x", ENDPOINT=f"http://127.0.0.1:{free_port()}")
    backend = make_backend(attrs, tmp_path, max_attempts=1)
    with pytest.raises(RemoteError) as err:
        backend.monitor()
    assert "cannot reach S3 at http://127.0.0.1:" in one_clear_line(err.value, rgw.secret_key)


# ---- delete ---------------------------------------------------------------------------------


def test_delete(rgw: CephRgw, s3, bucket: str, tmp_path: Path, capsys) -> None:
    image = tmp_path / "img"
    write_random(image, 1000)
    backend = make_backend(market_attrs(rgw, bucket), tmp_path)
    result = do_import(backend, str(image))
    assert backend.delete_app(App(id=7, name="a", source=result.source)) is True
    assert not object_exists(s3, bucket, "marketapp-7")
    assert backend.delete_app(App(id=7, name="a", source=result.source)) is False
    assert f"WARN: s3://{bucket}/marketapp-7 does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source",
    ["s3://another-bucket/marketapp-7", "s3://{b}/dir/marketapp-7", "s3://{b}/", "http://x/y"],
)
def test_delete_refuses_foreign_sources(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, source: str
) -> None:
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="dir/marketapp-7", Body=b"x")
    backend = make_backend(market_attrs(rgw, bucket), tmp_path)
    with pytest.raises(UnsafePathError, match=r"refused|not an s3"):
        backend.delete_app(App(id=7, name="a", source=source.format(b=bucket)))
    assert object_exists(s3, bucket, "dir/marketapp-7")


# ---- monitor --------------------------------------------------------------------------------


def test_usage_over_1200_objects_exact(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    s3.create_bucket(Bucket=bucket)
    sizes = [1000 + (i * 37) % 4000 for i in range(1200)]

    def put(i: int) -> None:
        s3.put_object(Bucket=bucket, Key=f"obj-{i:05d}", Body=b"z" * sizes[i])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(sizes))))
    backend = make_backend(market_attrs(rgw, bucket, TOTAL_MB="100"), tmp_path)

    assert backend.used_bytes() == sum(sizes)  # RGW's x-rgw-bytes-used
    calls: list[str] = []
    real = backend.client.get_paginator
    backend.client.get_paginator = lambda name: calls.append(name) or real(name)
    backend.use_usage_header = False
    assert backend.used_bytes() == sum(sizes)  # listed, 1,000 keys a page
    assert calls == ["list_objects_v2"]
    assert sum(sizes[:1000]) < sum(sizes)
    backend.use_usage_header = True
    real_head = backend.client.head_bucket
    for reported in ("9" * 5000, "\u00b2", "-5"):  # no count: the listing is used instead

        def head(reported: str = reported, **kw: object) -> dict:
            answer = real_head(**kw)
            answer["ResponseMetadata"]["HTTPHeaders"]["x-rgw-bytes-used"] = reported
            return answer

        backend.client.head_bucket = head
        assert backend.used_bytes() == sum(sizes)
    backend.client.head_bucket = real_head

    result = backend.monitor()
    used_mb = -(-sum(sizes) // MIB)
    assert (result.used_mb, result.total_mb, result.free_mb) == (used_mb, 100, 100 - used_mb)
    assert result.apps == []
    printed = parse_template(result.to_template()).as_dict()
    assert printed == {"USED_MB": str(used_mb), "FREE_MB": str(100 - used_mb), "TOTAL_MB": "100"}


def test_monitor_defaults_and_missing_bucket(rgw: CephRgw, tmp_path: Path) -> None:
    backend = make_backend(market_attrs(rgw, new_bucket()), tmp_path)
    result = backend.monitor()
    assert (result.used_mb, result.free_mb, result.total_mb) == (0, 1048576, 1048576)


# ---- nothing on stdout, no secret anywhere, even in debug mode -----------------------------


def s3_payload(attrs: dict[str, str], source: str = "", md5: str = "", size_mb: int = 0) -> str:
    """IMPORT (with IMPORT_* children) when ``source`` is given, else DELETE of app 7."""
    app = app_xml(id=7, name="app", source=f"s3://{attrs['BUCKET']}/marketapp-7")
    if source:
        info = import_info_xml(source=source, md5=md5, size_mb=size_mb, format="raw")
        return import_payload("s3", attrs, app=app, import_info=info)
    return delete_payload("s3", attrs, app=app)


def run_action(action: str, payload: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ONE_MARKET_DEBUG="1", ONE_LOCATION=str(tmp_path / "one"))
    return subprocess.run(
        [sys.executable, "-m", "onemarket.runner", "s3", action, payload],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=240,
        check=False,
    )


def test_no_secret_and_clean_stdout_in_debug_mode(
    rgw: CephRgw, bucket: str, tmp_path: Path
) -> None:
    image = tmp_path / "img"
    md5, _ = write_random(image, 7 * MIB)
    attrs = market_attrs(rgw, bucket, READ_LENGTH="5")
    secrets = [rgw.secret_key]

    done = run_action("import", s3_payload(attrs, str(image), md5, size_mb=7), tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    printed = parse_template(done.stdout).as_dict()
    assert printed == {
        "SOURCE": f"s3://{bucket}/marketapp-7",
        "MD5": md5,
        "SIZE": "7",
        "FORMAT": "raw",
    }
    assert b"DEBUG:" in done.stderr, "debug mode shows botocore's log lines"
    runs = [done]
    runs.append(run_action("monitor", monitor_payload("s3", attrs), tmp_path))
    assert runs[-1].returncode == 0
    assert parse_template(runs[-1].stdout).as_dict()["USED_MB"] == "7"
    runs.append(run_action("delete", s3_payload(attrs), tmp_path))
    assert runs[-1].returncode == 0 and runs[-1].stdout == b""

    wrong = dict(attrs, SECRET_ACCESS_KEY="anotherSecretNeverShown0000000000000009")
    secrets.append(wrong["SECRET_ACCESS_KEY"])
    failed = run_action("import", s3_payload(wrong, str(image), md5), tmp_path)
    assert failed.returncode != 0 and failed.stdout == b""
    assert "rejected the credentials" in failed.stderr.decode().strip().splitlines()[-1]
    runs.append(failed)
    for run in runs:
        for secret in secrets:
            assert secret.encode() not in run.stdout + run.stderr
            assert base64.b64encode(secret.encode()) not in run.stdout + run.stderr


def test_in_process_logging_never_reaches_stdout(rgw: CephRgw, bucket: str, tmp_path: Path) -> None:
    driverlog.set_debug(True)
    driverlog.route_std_logging()
    out, err = io.StringIO(), io.StringIO()
    old = driverlog.stream
    driverlog.stream = err
    try:
        with redirect_stdout(out):
            make_backend(market_attrs(rgw, bucket), tmp_path).monitor()
    finally:
        driverlog.stream = old
        driverlog.set_debug(False)
        driverlog.route_std_logging()
    assert out.getvalue() == ""
    assert "DEBUG: botocore" in err.getvalue()
    assert rgw.secret_key not in err.getvalue()


# ---- client configuration (no server needed) -----------------------------------------------


def settings_for(**attrs: str) -> S3Settings:
    base = {
        "ACCESS_KEY_ID": "AKIDEXAMPLE",
        "SECRET_ACCESS_KEY": "configSecretNeverShown000000000000000001",
        "REGION": "eu-west-3",
        "BUCKET": "bucket-one",
    }
    base.update(attrs)
    return S3Settings.from_market(Market(id=1, name="cfg", driver="s3", attrs=base))


def test_settings_for_aws_and_compatible_endpoints() -> None:
    aws = client_config(settings_for())
    assert aws.signature_version == "s3v4" and aws.region_name == "eu-west-3"
    assert aws.request_checksum_calculation != "when_required"
    assert aws.retries == {"mode": "standard", "max_attempts": s3config.MAX_ATTEMPTS}
    assert (aws.connect_timeout, aws.read_timeout) == (
        s3config.CONNECT_TIMEOUT_S,
        s3config.READ_TIMEOUT_S,
    )
    assert aws.max_pool_connections >= s3mod.UPLOAD_WORKERS + 1

    ceph = settings_for(ENDPOINT="http://127.0.0.1:7480/", AWS="no", SIGNATURE_VERSION="s3")
    cfg = client_config(ceph)
    assert ceph.endpoint == "http://127.0.0.1:7480" and not ceph.aws
    assert cfg.signature_version == "s3"
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.s3 == {"addressing_style": "path"}
    # an endpoint outside amazonaws.com is not AWS even without AWS=no
    assert not settings_for(ENDPOINT="https://s3.example.org").aws
    assert settings_for(ENDPOINT="https://s3.eu-west-3.amazonaws.com").aws
    assert client_config(settings_for(FORCE_PATH_STYLE="NO", ENDPOINT="https://x.org")).s3 == {
        "addressing_style": "virtual"
    }
    assert client_config(ceph, sign_payload=False).s3["payload_signing_enabled"] is False


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"REGION": ""}, "REGION"),
        ({"SIGNATURE_VERSION": "v3"}, "SIGNATURE_VERSION"),
        ({"ENDPOINT": "ftp://host"}, "ENDPOINT"),
        ({"BUCKET": "a/b"}, "BUCKET"),
    ],
)
def test_settings_errors(attrs: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings_for(**attrs)


def test_secret_registered_and_kept_out_of_repr() -> None:
    settings = settings_for()
    assert settings.secret_access_key not in repr(settings)
    assert driverlog.scrub(f"x {settings.secret_access_key} y") == "x **** y"


def test_endpoint_password_masked_in_messages() -> None:
    """An ENDPOINT written with user:password@ shows in every message naming the endpoint."""
    settings = settings_for(ENDPOINT="http://admin:EndpointPassw0rd@127.0.0.1:9")
    exc = EndpointConnectionError(endpoint_url=settings.endpoint)
    line = driverlog.scrub(str(s3config.s3_error(exc, "x", settings.where)))
    assert "EndpointPassw0rd" not in line and "admin:****@127.0.0.1:9" in line


def test_error_mapping_is_one_line_without_secret() -> None:
    secret = settings_for().secret_access_key

    def client_error(code: str, status: int, message: str = "") -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    cases = [
        (client_error("SignatureDoesNotMatch", 403, f"bad {secret}"), ConfigError, "credentials"),
        (client_error("AccessDenied", 403), StorageError, "access denied"),
        (client_error("403", 403, "Forbidden"), StorageError, "access denied"),
        (client_error("BadDigest", 400), ChecksumError, "corrupted"),
        (client_error("QuotaExceeded", 403), StorageError, "access denied"),
        (client_error("NoSuchBucket", 404), StorageError, "not found"),
        (client_error("InternalError", 500, "boom\nline two"), RemoteError, "boom; line two"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), RemoteError, "cannot reach"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), ActionTimeout, "in time"),
        (NoCredentialsError(), ConfigError, "credentials"),
    ]
    for exc, kind, words in cases:
        err = s3_error(exc, "upload of s3://b/k", "http://127.0.0.1:1")
        assert isinstance(err, kind), (exc, err)
        assert words in str(err) and "\n" not in str(err) and secret not in str(err)
        assert str(err).startswith("upload of s3://b/k: ")


def test_signature_v2_against_rgw(rgw: CephRgw, s3, bucket: str, tmp_path: Path) -> None:
    image = tmp_path / "img"
    md5, _ = write_random(image, 6 * MIB)
    attrs = market_attrs(rgw, bucket, SIGNATURE_VERSION="s3", READ_LENGTH="5")
    result = do_import(make_backend(attrs, tmp_path), str(image), md5=md5)
    assert s3.head_object(Bucket=bucket, Key="marketapp-7")["Metadata"]["md5"] == md5
    assert result.size_mb == 6


def test_metadata_by_multipart_copy_for_objects_over_copy_limit(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects over 5 GiB cannot be copied by CopyObject: the checksums are then set with a
    server-side UploadPartCopy. Exercised here with the limits scaled down."""
    monkeypatch.setattr(s3mod, "MAX_COPY_BYTES", 6 * MIB)
    monkeypatch.setattr(s3mod, "COPY_PART_BYTES", 5 * MIB)
    image = tmp_path / "img"
    md5, _ = write_random(image, 13 * MIB + 3)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    copies: list[str] = []
    real = backend.client.upload_part_copy
    backend.client.upload_part_copy = lambda **kw: (
        copies.append(kw["CopySourceRange"]) or real(**kw)
    )
    do_import(backend, str(image), md5=md5)
    assert copies == ["bytes=0-5242879", "bytes=5242880-10485759", "bytes=10485760-13631490"]
    obj = s3.get_object(Bucket=bucket, Key="marketapp-7")
    assert obj["Metadata"] == {"md5": md5}
    assert hashlib.md5(obj["Body"].read()).hexdigest() == md5
    assert uploads_left(s3, bucket) == []


class UploadPartSpy:
    """Wraps the backend's ``upload_part``: keeps each call's arguments and how many calls were
    running when it started, to check the concurrency the import really used."""

    def __init__(self, backend) -> None:
        self._real = backend.data_client.upload_part
        self._lock = threading.Lock()
        self._running = 0
        self.seen: list[dict] = []
        self._at_start: list[int] = []
        backend.data_client.upload_part = self

    def __call__(self, **kwargs):
        with self._lock:
            self._running += 1
            # the Body buffer is reused after the call: keep its length as it was sent
            self.seen.append({**kwargs, "BodyLength": len(kwargs.get("Body", b""))})
            self._at_start.append(self._running)
        try:
            return self._real(**kwargs)
        finally:
            with self._lock:
                self._running -= 1

    def most_at_once(self, which=lambda kwargs: True) -> int:
        """Most calls running at once when a call matching ``which`` started."""
        return max(
            (n for kw, n in zip(self.seen, self._at_start, strict=True) if which(kw)), default=0
        )


def serve_chunked(httpd, path: str, total: int):
    """Serve ``total`` random bytes at ``path`` with chunked encoding (no Content-Length), as
    a source of unknown size; returns the md5 object of what is served."""
    piece = os.urandom(MIB)
    data_md5 = hashlib.md5()
    for i in range(0, total, MIB):
        data_md5.update(piece[: min(MIB, total - i)])

    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, total, MIB):
            chunk = piece[: min(MIB, total - i)]
            h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    httpd.routes[path] = chunked
    return data_md5


def test_unknown_size_stream_grows_its_parts(
    rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source of unknown size (chunked http, ssh, stock downloader): parts keep READ_LENGTH,
    then double, so 10,000 parts always suffice (growth scaled down here)."""
    monkeypatch.setattr(s3mod, "GROWTH_FROM_PART", 2)
    monkeypatch.setattr(s3mod, "GROWTH_STEP_PARTS", 1)
    total = 37 * MIB + 11
    data_md5 = serve_chunked(httpd, "/stream", total)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    sizes: list[int] = []
    real = backend.data_client.upload_part
    backend.data_client.upload_part = lambda **kw: sizes.append(kw["ContentLength"]) or real(**kw)
    result = do_import(backend, f"{httpd.url}/stream", md5=data_md5.hexdigest())
    assert sorted(sizes) == sorted([5 * MIB, 5 * MIB, 10 * MIB, 17 * MIB + 11])
    assert result.md5 == data_md5.hexdigest() and result.size_mb == 38
    assert s3.head_object(Bucket=bucket, Key="marketapp-7")["ContentLength"] == total


def test_large_parts_are_sent_fewer_at_a_time(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large READ_LENGTH must not multiply into workers x part size of memory: the number of
    part buffers alive at once is capped by PART_MEMORY_BUDGET_BYTES (scaled down here)."""
    assert s3mod.buffers_for(16 * MIB, 4) == 5
    assert s3mod.buffers_for(32 * MIB, 4) == 2
    assert s3mod.buffers_for(4096 * MIB, 4) == 2
    monkeypatch.setattr(s3mod, "PART_MEMORY_BUDGET_BYTES", 12 * MIB)
    image = tmp_path / "img"
    md5, _ = write_random(image, 31 * MIB)
    alive: set[int] = set()
    peak = {"buffers": 0}
    real_part_buffer = s3mod.S3Upload._part_buffer

    def tracking_part_buffer(self, size, buf=None):
        out = real_part_buffer(self, size, buf)
        alive.add(id(out))
        peak["buffers"] = max(peak["buffers"], len(alive))
        return out

    monkeypatch.setattr(s3mod.S3Upload, "_part_buffer", tracking_part_buffer)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    spy = UploadPartSpy(backend)
    result = do_import(backend, str(image), md5=md5)
    assert result.md5 == md5
    assert peak["buffers"] <= 2
    assert spy.most_at_once() <= 2
    assert s3.head_object(Bucket=bucket, Key="marketapp-7")["Metadata"]["md5"] == md5


def test_grown_parts_reduce_buffers_without_stalling(
    rgw: CephRgw, s3, httpd, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When parts of an unknown-size stream grow past the memory budget, slots are retired
    while earlier parts are still being sent; the import goes on and ends complete."""
    monkeypatch.setattr(s3mod, "GROWTH_FROM_PART", 3)
    monkeypatch.setattr(s3mod, "GROWTH_STEP_PARTS", 1)
    monkeypatch.setattr(s3mod, "PART_MEMORY_BUDGET_BYTES", 24 * MIB)
    total = 41 * MIB + 5
    data_md5 = serve_chunked(httpd, "/stream", total)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    spy = UploadPartSpy(backend)
    result = do_import(backend, f"{httpd.url}/stream", md5=data_md5.hexdigest())
    assert result.md5 == data_md5.hexdigest()
    assert 1 <= spy.most_at_once(lambda kw: kw["ContentLength"] > 5 * MIB) <= 2
    assert s3.head_object(Bucket=bucket, Key="marketapp-7")["ContentLength"] == total
    assert uploads_left(s3, bucket) == []


@pytest.mark.parametrize("size", [1000, 12 * MIB])
def test_sigterm_after_the_object_is_stored_removes_it(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, size: int
) -> None:
    """SIGTERM in the last moments of an import (final progress report, source close) fails
    the import: the object it already stored must not stay behind as an orphan."""
    image = tmp_path / "img"
    write_random(image, size)
    pid = os.getpid()

    def term_on_final(event: ProgressEvent) -> None:
        if event.final:
            os.kill(pid, signal.SIGTERM)

    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path, term_on_final)
    with pytest.raises(ActionTimeout, match="SIGTERM"):
        do_import(backend, str(image))
    assert_nothing_left(s3, bucket)


def test_small_source_not_read_into_a_whole_part(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a large READ_LENGTH, a small file of known size must not cost a whole part of
    memory (bytearray(4 GiB) for a 1 KB image)."""
    image = tmp_path / "img"
    md5, _ = write_random(image, 1000)
    asked: list[int] = []
    real_part_buffer = s3mod.S3Upload._part_buffer

    def recording_part_buffer(self, size, buf=None):
        asked.append(size)
        return real_part_buffer(self, size, buf)

    monkeypatch.setattr(s3mod.S3Upload, "_part_buffer", recording_part_buffer)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="4096"), tmp_path)
    assert do_import(backend, str(image), md5=md5).md5 == md5
    assert asked == [1001]
    assert s3.head_object(Bucket=bucket, Key="marketapp-7")["ContentLength"] == 1000


def test_part_sender_lets_go_of_sent_parts() -> None:
    """A sent part's buffer is reused or freed, never held to the end of the upload (a done
    future keeps its callbacks): memory stays bounded however many parts a stream needs."""
    sender = s3mod._PartSender(
        2, MIB, send=lambda n, body: f"etag{n}", on_sent=lambda n: None, error=lambda e, n: e
    )
    for number in range(1, 41):
        buf = sender.buffer(MIB) or bytearray(MIB)
        sender.submit(number, buf)
        assert len(sender._inflight) <= 4
    assert len(sender.finish()) == 40


@pytest.mark.parametrize("completed", [True, False], ids=["after-completion", "before-it"])
def test_put_file_stopped_at_completion_leaves_no_unchecked_object(
    rgw: CephRgw, s3, bucket: str, tmp_path: Path, completed: bool
) -> None:
    """The mirror's put_file has no claim to delete. A stop signal once the server has
    completed the upload, before its ETag check: the unchecked object goes. One before the
    completion: the previous object stays, and no upload is left."""
    image = tmp_path / "img"
    write_random(image, 12 * MIB)
    backend = make_backend(market_attrs(rgw, bucket, READ_LENGTH="5"), tmp_path)
    backend._ensure_bucket()
    s3.put_object(Bucket=bucket, Key="mirror/x", Body=b"previous")
    real = backend.client.complete_multipart_upload

    def complete(**kwargs):
        if completed:
            real(**kwargs)
        raise Interrupted("mirror stopped by SIGTERM", signal.SIGTERM)

    backend.client.complete_multipart_upload = complete
    with pytest.raises(MarketError):
        backend.put_file("mirror/x", str(image))
    assert uploads_left(s3, bucket) == []
    if completed:
        assert not object_exists(s3, bucket, "mirror/x")
    else:
        assert s3.get_object(Bucket=bucket, Key="mirror/x")["Body"].read() == b"previous"
