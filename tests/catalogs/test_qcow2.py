"""Virtual size from a qcow2 header: parser checked against qemu-img, ranged GETs, the cache."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from onemarket import web
from onemarket.catalogs import qcow2
from onemarket.catalogs.qcow2 import (
    Qcow2HeaderError,
    VirtualSizeCache,
    fetch_virtual_size,
    parse_virtual_size,
    virtual_sizes,
)
from onemarket.errors import RemoteError

from tests.qemu_img import qemu_img_virtual_size
from tests.servers import need_program


def make_qcow2(tmp_path: Path, size: str, compat: str = "1.1", cluster: int = 65536) -> Path:
    qemu_img = need_program("qemu-img", "qemu-utils")
    path = tmp_path / f"d-{size}-{compat}-{cluster}.qcow2"
    subprocess.run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"compat={compat},cluster_size={cluster}",
            str(path),
            size,
        ],
        check=True,
        timeout=60,
    )
    return path


def header(size: int, version: int = 3, cluster_bits: int = 16, magic: bytes = b"QFI\xfb") -> bytes:
    return struct.pack(">4sIQIIQ", magic, version, 0, 0, cluster_bits, size).ljust(104, b"\0")


@pytest.mark.parametrize(
    ("size", "compat", "cluster"),
    [
        ("1M", "1.1", 65536),
        ("10G", "1.1", 65536),
        ("3221225985", "0.10", 4096),  # not a multiple of a MiB, qcow2 version 2
        ("2T", "1.1", 2097152),
    ],
)
def test_parser_agrees_with_qemu_img(tmp_path: Path, size: str, compat: str, cluster: int) -> None:
    path = make_qcow2(tmp_path, size, compat, cluster)
    with path.open("rb") as f:
        assert parse_virtual_size(f.read(qcow2.HEADER_BYTES)) == qemu_img_virtual_size(path)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"QFI\xfb",
        header(1 << 20, magic=b"QFI\x00"),
        header(1 << 20, version=4),
        header(1 << 20, cluster_bits=8),
        header(1 << 20, cluster_bits=22),
        header(0),
        header(qcow2.MAX_VIRTUAL_SIZE_BYTES + 1),
        b"\x00" * 512,
    ],
)
def test_parser_rejects_what_is_not_a_qcow2_header(data: bytes) -> None:
    with pytest.raises(Qcow2HeaderError):
        parse_virtual_size(data)


def test_ranged_get_reads_only_the_header(httpd, tmp_path: Path) -> None:
    path = make_qcow2(tmp_path, "5G")
    body = path.read_bytes() + b"\0" * 100_000
    httpd.routes["/d.qcow2"] = body
    with requests.Session() as s:
        assert fetch_virtual_size(s, httpd.url + "/d.qcow2") == qemu_img_virtual_size(path)
    (req,) = httpd.requests
    assert req.headers["Range"] == f"bytes=0-{qcow2.HEADER_BYTES - 1}"


def test_server_ignoring_range_still_works(httpd) -> None:
    sent = {"n": 0}

    def whole_file(h: BaseHTTPRequestHandler) -> None:
        body = header(7 << 30) + b"x" * 1_000_000
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
            sent["n"] += 1
        except OSError:
            pass  # the client hung up after the header, as it should

    httpd.routes["/big.qcow2"] = whole_file
    with requests.Session() as s:
        assert fetch_virtual_size(s, httpd.url + "/big.qcow2") == 7 << 30


@pytest.mark.parametrize(("route", "expect"), [(None, "HTTP 404"), (b"<html>", "not a qcow2")])
def test_fetch_failures_are_one_line_naming_the_url(httpd, route, expect: str) -> None:
    if route is not None:
        httpd.routes["/x.qcow2"] = route
    with requests.Session() as s, pytest.raises(RemoteError) as err:
        fetch_virtual_size(s, httpd.url + "/x.qcow2")
    msg = str(err.value)
    assert "\n" not in msg and expect in msg and httpd.url + "/x.qcow2" in msg


def test_cache_round_trip_and_damage(tmp_path: Path) -> None:
    cache = VirtualSizeCache.in_dir(tmp_path)
    cache.put("a" * 64, 123)
    cache.save()
    again = VirtualSizeCache.in_dir(tmp_path)
    assert again.get("a" * 64) == 123
    assert again.get("b" * 64) is None
    (tmp_path / qcow2.CACHE_FILE_NAME).write_text('{"sizes": {"x": "oops"}, ')
    assert len(VirtualSizeCache.in_dir(tmp_path)) == 0
    (tmp_path / qcow2.CACHE_FILE_NAME).write_text('{"sizes": {"x": ["1", 2], "y": [5, 6]}}')
    damaged = VirtualSizeCache.in_dir(tmp_path)
    assert damaged.get("x") is None and damaged.get("y") == 5
    assert not list(tmp_path.glob(".tmp-*"))


def test_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcow2, "CACHE_MAX_ENTRIES", 3)
    cache = VirtualSizeCache.in_dir(tmp_path)
    for i in range(10):
        cache.put(f"{i:064x}", i + 1)
    cache.save()
    assert len(VirtualSizeCache.in_dir(tmp_path)) == 3


def test_second_lookup_makes_no_request(httpd, tmp_path: Path) -> None:
    wanted = {}
    for i in range(6):
        httpd.routes[f"/{i}.qcow2"] = header((i + 1) << 30)
        wanted[f"{i:064x}"] = f"{httpd.url}/{i}.qcow2"
    with requests.Session() as s:
        first = virtual_sizes(s, wanted, VirtualSizeCache.in_dir(tmp_path))
        second = virtual_sizes(s, wanted, VirtualSizeCache.in_dir(tmp_path))
    assert first.requests == 6 and not first.failures
    assert second.requests == 0
    assert first.sizes == second.sizes == {f"{i:064x}": (i + 1) << 30 for i in range(6)}
    assert len(httpd.requests) == 6


def test_failures_stop_after_the_limit(httpd, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(qcow2, "MAX_FAILURES_PER_RUN", 2)
    wanted = {f"{i:064x}": f"{httpd.url}/missing{i}.qcow2" for i in range(5)}
    with requests.Session() as s:
        out = virtual_sizes(s, wanted, VirtualSizeCache(None), concurrency=1)
    assert out.requests == 2 and len(out.failures) == 2 and out.not_tried == 3
    assert len(httpd.requests) == 2


def test_requests_per_run_are_capped_and_the_rest_deferred(
    httpd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog listing thousands of new images cannot hold one monitor for thousands of
    ranged requests: the rest wait for the next monitors, which the cache makes cheap."""
    monkeypatch.setattr(qcow2, "MAX_REQUESTS_PER_RUN", 4)
    wanted = {}
    for i in range(10):
        httpd.routes[f"/{i}.qcow2"] = header((i + 1) << 30)
        wanted[f"{i:064x}"] = f"{httpd.url}/{i}.qcow2"
    runs = []
    with requests.Session() as s:
        for _ in range(3):
            runs.append(virtual_sizes(s, wanted, VirtualSizeCache.in_dir(tmp_path)))
    assert [(r.requests, r.deferred, len(r.sizes)) for r in runs] == [
        (4, 6, 4),
        (4, 2, 8),
        (2, 0, 10),
    ]
    assert len(httpd.requests) == 10


def test_failure_messages_mask_the_password(httpd) -> None:
    url = httpd.url.replace("http://", "http://reader:s3cr3t-Pa55@") + "/missing.qcow2"
    with requests.Session() as s, pytest.raises(RemoteError) as err:
        fetch_virtual_size(s, url)
    msg = str(err.value)
    assert "s3cr3t" not in msg and "reader:****@" in msg and "HTTP 404" in msg


def test_cache_save_sweeps_what_a_killed_save_left(tmp_path: Path) -> None:
    """A save SIGKILLed mid-write leaves its .tmp-*.json; the next save removes it once old."""
    leftover = tmp_path / ".tmp-0123abcd.json"
    leftover.write_text("{")
    old = time.time() - 2 * web.STALE_TMP_S
    os.utime(leftover, (old, old))
    cache = VirtualSizeCache.in_dir(tmp_path)
    cache.put("a" * 64, 1)
    cache.save()
    assert not leftover.exists()
    assert VirtualSizeCache.in_dir(tmp_path).get("a" * 64) == 1
