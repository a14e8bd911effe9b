"""The datastore downloader: option parsing, stream stages, hand-over to the stock script, and
s3:// downloads from the real Ceph RGW (objects written by our s3 import)."""

from __future__ import annotations

import base64
import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from onemarket import downloader as dl
from onemarket.errors import ChecksumError, RemoteError, SourceError, StorageError
from onemarket.location import S3Location
from onemarket.transfer import sinks, sources, stages

from tests import payloads
from tests.backends.test_s3 import raw_client
from tests.servers import free_port

TIMEOUT_S = 120
"""Bound on every downloader process run by these tests."""
BUCKET = "downloader-tests"
"""The RGW bucket of these tests' market (apps 9001 and 9002, keys ``dl-<id>``)."""


def run_downloader(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes = b"",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """The downloader as oned's datastore scripts run it: a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "onemarket.downloader", *args],
        input=stdin,
        capture_output=True,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
        timeout=TIMEOUT_S,
        check=False,
    )


def failure_lines(error_line: str) -> list[str]:
    """What a failure writes: the ``ERROR:`` line for oned.log, then (OpenNebula 7.x, the
    default release line) the same text unprefixed, the line oned keeps for the image's error
    message (see downloader.report_failure)."""
    assert error_line.startswith("ERROR: ")
    return [error_line, error_line[len("ERROR: ") :] + ";"]


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The failure line; asserts a failure with exactly that one message and nothing on
    stdout."""
    assert proc.returncode == dl.EXIT_FAILURE, proc.stderr
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert lines == failure_lines(lines[0]), lines
    return lines[0]


# ---------------------------------------------------------------------------------------------
# command line


def test_options_like_the_stock_script() -> None:
    opts = dl.parse_args(["-m", "ABC", "-n", "--limit", "2M", "-o", "s3://b/k", "/tmp/x"])
    assert (opts.hashes, opts.nodecomp, opts.noretry) == (
        (("md5", "abc"),),
        True,
        True,
    )
    assert opts.limit_bps == 2 * 1024 * 1024
    assert (opts.source, opts.dest, opts.to_stdout) == ("s3://b/k", "/tmp/x", False)
    # GNU getopt: options after the operands, long forms, "=value"
    opts = dl.parse_args(["s3://b/k", "-", "--sha1=f00", "--nodec"])
    assert (opts.hashes, opts.nodecomp, opts.to_stdout) == (
        (("sha1", "f00"),),
        True,
        True,
    )
    assert dl.parse_args(["--max-size", "1024", "s3://b/k", "-"]).max_size == 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100", 100), ("1k", 1024), ("1.5K", 1536), ("10M", 10 << 20), ("1g", 1 << 30)],
)
def test_rates_as_curl_reads_them(text: str, expected: float) -> None:
    assert dl.parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("4096", 4096), ("1K", 1024), ("1KB", 1000), ("2MiB", 2 << 20)]
)
def test_sizes_as_head_reads_them(text: str, expected: int) -> None:
    assert dl.parse_size(text) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "x", "-c", "10", "s3://b/k", "-"],
        ["s3://b/k"],
        ["-l", "fast", "s3://b/k", "-"],
        ["-c", "ten", "s3://b/k", "-"],
        ["--bogus", "s3://b/k", "-"],
    ],
)
def test_bad_command_lines_are_one_line(argv: list[str]) -> None:
    proc = run_downloader(*argv)
    one_line_error(proc)


HUGE = "9" * 5000
"""Past int()'s 4,300-digit limit: its ValueError once ended these in '... failed (ValueError)'."""


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-c", HUGE, "s3://b/k", "out"], "invalid --max-size: '9999"),
        (["-l", HUGE, "s3://b/k", "out"], "invalid --limit rate '9999"),
        ([f"lxd://http://127.0.0.1:1/images/x/rootfs.tar.xz?size={HUGE}", "out"], "size='9999"),
    ],
)
def test_numbers_of_thousands_of_digits_are_named_in_one_line(argv: list[str], says: str) -> None:
    line = one_line_error(run_downloader(*argv))
    assert says in line and "(5000 chars)" in line and "ValueError" not in line
    assert len(line) < 200


def test_a_malformed_lxd_image_url_is_one_line_without_its_password() -> None:
    line = one_line_error(run_downloader("lxd://http://u:s3cr3t-pw@[::1/x?size=1", "out"))
    assert "the lxd:// source's image address is not a valid URL (unbalanced '['" in line
    assert "s3cr3t-pw" not in line


def test_hash_with_partial_read_refused_like_stock() -> None:
    line = one_line_error(run_downloader("--md5", "x", "-c", "10", "s3://b/k", "-"))
    assert "Hash check not supported for partial downloads" in line


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        (["s3://b/k", "-"], True),
        (["-n", "s3://b/k", "/x"], True),
        (["http://h/f", "-"], False),
        (["/var/tmp/f", "-"], False),
        (["--weird-option", "http://h/f", "-"], False),
        (["S3://b/k", "-"], False),
        (["lxd://http://h/images/x/rootfs.tar.xz?size=1", "-"], True),
        (["--weird-option", "lxd://http://h/x", "-"], True),
    ],
)
def test_which_sources_are_ours(argv: list[str], ours: bool) -> None:
    assert (dl.request_scheme(argv) is not None) is ours


def test_s3_locations() -> None:
    assert dl.s3_location("s3://bucket/marketapp-7") == S3Location("bucket", "marketapp-7")
    assert dl.s3_location("s3://b/dir/key").key == "dir/key"
    for bad in ("s3://", "s3://bucket", "s3://bucket/", "s3:///key"):
        with pytest.raises(dl.UsageError):
            dl.s3_location(bad)


# ---------------------------------------------------------------------------------------------
# stream stages


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


PAYLOAD = hashlib.sha256(b"seed").digest() * 40_000 + os.urandom(50_000)
COMPRESSORS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("piece", [1, 4096, 1 << 20])
def test_decompression_streams_in_any_chunking(kind: str, piece: int) -> None:
    packed = COMPRESSORS[kind](PAYLOAD[: 20_000 if piece == 1 else None])
    assert stages.detect_compression(packed[:16]) == kind
    dec = stages.Decompressor(kind, "test")
    out = b"".join(p for c in chunks_of(packed, piece) for p in dec.feed(c))
    dec.finish()
    assert out == PAYLOAD[: 20_000 if piece == 1 else None]


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_concatenated_members_and_nul_padding(kind: str) -> None:
    compress = COMPRESSORS[kind]
    packed = compress(b"first ") + compress(b"second") + b"\0" * 8
    dec = stages.Decompressor(kind, "test")
    assert b"".join(dec.feed(packed)) == b"first second"
    dec.finish()


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_truncated_and_corrupt_compressed_data(kind: str) -> None:
    packed = COMPRESSORS[kind](PAYLOAD)
    dec = stages.Decompressor(kind, "s3://b/k")
    for _ in dec.feed(packed[: len(packed) // 2]):
        pass
    with pytest.raises(SourceError, match="truncated"):
        dec.finish()
    dec = stages.Decompressor(kind, "s3://b/k")
    with pytest.raises(SourceError, match="corrupt"):
        for _ in dec.feed(packed + b"trailing garbage"):
            pass


def test_decompression_output_is_bounded_per_step() -> None:
    """A small gzip of 64 MiB of zeros never yields more than one chunk at a time."""
    zeros = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    dec = stages.Decompressor("gzip", "bomb")
    total = 0
    for piece in dec.feed(zeros):
        assert len(piece) <= stages.CHUNK_BYTES
        total += len(piece)
    dec.finish()
    assert total == 64 << 20


def test_archives_recognised() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("disk.img")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert stages.detect_archive(buf.getvalue()[:512]) == "tar"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("disk.img", b"abc")
    assert stages.detect_archive(buf.getvalue()[:512]) == "zip"
    assert stages.detect_archive(b"QFI\xfb" + b"\0" * 600) is None


class FakeBody:
    """A response body that breaks (ConnectionResetError) after ``cut`` bytes."""

    def __init__(self, data: bytes, cut: int | None = None) -> None:
        self.data, self.cut, self.pos, self.closed = data, cut, 0, False

    def read(self, n: int) -> bytes:
        if self.cut is not None and self.pos >= self.cut:
            raise ConnectionResetError("reset by peer")
        end = self.pos + n if self.cut is None else min(self.pos + n, self.cut)
        out = self.data[self.pos : end]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True


def test_resume_after_dropped_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    data = os.urandom(300_000)
    offsets: list[int] = []

    def open_at(offset: int) -> FakeBody:
        offsets.append(offset)
        # every connection breaks 100 kB later, except the last
        return FakeBody(data[offset:], cut=100_000 if offset < 200_000 else None)

    reader = sources.ResumingReader(
        open_at, len(data), "s3://b/k", attempts=3, body=FakeBody(data, cut=50_000)
    )
    out = b"".join(iter(lambda: reader.read(8192), b""))
    assert out == data
    assert offsets == [50_000, 150_000, 250_000]
    assert reader.resumes == 3


def test_resumes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    data = os.urandom(10_000)

    def open_at(offset: int) -> FakeBody:
        return FakeBody(data[offset:], cut=0)

    reader = sources.ResumingReader(
        open_at, len(data), "s3://b/k", attempts=2, body=FakeBody(data, 10)
    )
    with pytest.raises(RemoteError, match=r"connection lost at byte 10 of 10000 .* after 2"):
        while reader.read(100):
            pass


def test_short_body_counts_as_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    data = b"x" * 1000
    reader = sources.ResumingReader(
        lambda off: FakeBody(data[off:]), len(data), "s", attempts=1, body=FakeBody(data[:400])
    )
    assert b"".join(iter(lambda: reader.read(64), b"")) == data
    assert reader.resumes == 1


def test_rate_limiter_sleeps_to_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    slept: list[float] = []
    monkeypatch.setattr(
        stages.time, "sleep", lambda s: (slept.append(s), now.__setitem__(0, now[0] + s))
    )
    limiter = stages.RateLimiter(1000.0, clock=lambda: now[0])
    for _ in range(10):
        limiter.consumed(500)
    assert sum(slept) == pytest.approx(5.0)
    assert limiter.read_size == stages.MIN_THROTTLED_READ_BYTES


def copy_to(
    tmp_path: Path, raw: bytes, *argv: str, meta_md5: str = "", meta_sha256: str = ""
) -> Path:
    """The downloader's stages from ``raw`` into tmp_path/out with the given options."""
    dest = tmp_path / "out"
    opts = dl.parse_args([*argv, "s3://b/k", str(dest)])
    checks = dl.checks("s3://b/k", opts, meta_md5, meta_sha256)
    dl.copy_to_dest(io.BytesIO(raw), sinks.FileSink(str(dest), "s3://b/k"), opts, checks)
    return dest


def test_file_destination_hashes_and_cleanup(tmp_path: Path) -> None:
    raw = gzip.compress(PAYLOAD)
    md5 = hashlib.md5(raw).hexdigest()
    sha256 = hashlib.sha256(raw).hexdigest()
    dest = copy_to(tmp_path, raw, "--md5", md5.upper(), meta_md5=md5, meta_sha256=sha256)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ChecksumError, match="SHA256 mismatch"):
        copy_to(tmp_path, raw, meta_md5=md5, meta_sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []  # the stale destination went too, like the stock one
    with pytest.raises(ChecksumError, match="SHA1 mismatch"):
        copy_to(tmp_path, raw, "--sha1", "0" * 40)
    assert list(tmp_path.iterdir()) == []


def test_partial_read_and_nodecomp(tmp_path: Path) -> None:
    raw = xz = lzma.compress(PAYLOAD)
    assert copy_to(tmp_path, raw, "-c", "1000").read_bytes() == PAYLOAD[:1000]
    assert copy_to(tmp_path, xz, "-n").read_bytes() == xz
    assert copy_to(tmp_path, raw, "-c", str(len(PAYLOAD) * 2)).read_bytes() == PAYLOAD


@pytest.fixture(params=["data filter", "checks of our own"])
def tar_extraction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a tar is unpacked: Python's 'data' filter (3.11.4 on) and the same checks
    made by sinks.extract_data where Python lacks it (Debian 12's 3.11.2)."""
    if request.param != "data filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (tar_member("a", tarfile.SYMTYPE, "../../etc"), "symlink leaving the folder"),
        (tar_member("a", tarfile.SYMTYPE, "/etc"), "absolute symlink"),
        (tar_member("a", tarfile.LNKTYPE, "../x"), "hard link leaving the folder"),
        (tar_member("dev", tarfile.CHRTYPE), "device"),
        (tar_member("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_hostile_tar_members_are_refused(
    tmp_path: Path, tar_extraction: str, member: tarfile.TarInfo, why: str
) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="cannot unpack the tar archive"):
        copy_to(tmp_path / "d", tar_of((member, b"")))
    assert list((tmp_path / "d").iterdir()) == [], why


def test_a_symlink_then_a_file_through_it_cannot_leave_the_folder(
    tmp_path: Path, tar_extraction: str
) -> None:
    """A link inside the folder to '.', then a name through it that climbs out."""
    raw = tar_of(
        (tar_member("up", tarfile.SYMTYPE, "."), b""),
        (tar_member("up/../../escaped"), b"x"),
    )
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="cannot unpack the tar archive"):
        copy_to(tmp_path / "d", raw)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "d" / "escaped").exists()


def test_set_id_and_group_write_bits_are_dropped(tmp_path: Path, tar_extraction: str) -> None:
    raw = tar_of((tar_member("tool", mode=0o6777), b"#!/bin/sh\n"), (tar_member("data"), b"d"))
    dest = copy_to(tmp_path, raw)
    assert (dest / "tool").stat().st_mode & 0o7777 == 0o755
    assert (dest / "data").stat().st_mode & 0o7777 == 0o644


def test_archives_unpacked_into_the_destination(tmp_path: Path, tar_extraction: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("disk.img", b"disk"), ("meta/info.txt", b"info")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = copy_to(tmp_path, gzip.compress(buf.getvalue()))
    assert dest.is_dir()
    assert (dest / "disk.img").read_bytes() == b"disk"
    assert (dest / "meta" / "info.txt").read_bytes() == b"info"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("disk.img", b"zipped")
    dest2 = tmp_path / "z"
    opts = dl.parse_args(["s3://b/k", str(dest2)])
    dl.copy_to_dest(
        io.BytesIO(zbuf.getvalue()), sinks.FileSink(str(dest2), "s"), opts, dl.checks("s", opts)
    )
    assert (dest2 / "disk.img").read_bytes() == b"zipped"
    # -n: no decompression, no unpacking (the stock script sees octet-stream then)
    assert copy_to(tmp_path / "z", zbuf.getvalue(), "-n").read_bytes() == zbuf.getvalue()


def test_archive_escaping_its_folder_is_refused(tmp_path: Path, tar_extraction: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="cannot unpack the tar archive"):
        copy_to(tmp_path / "d", buf.getvalue())
    assert not (tmp_path / "escaped").exists()
    assert list((tmp_path / "d").iterdir()) == []


def test_destination_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a directory"):
        sinks.FileSink(str(tmp_path), "s")


# ---------------------------------------------------------------------------------------------
# hand-over of every other source to the stock script

STAND_IN = """#!/bin/bash
# records how it was run, like a stock downloader.sh would be
d='{record}'
printf '%s\\0' "$0" "$@" > "$d/argv"
cat /proc/$$/environ > "$d/environ"
grep '^SigIgn' /proc/$$/status > "$d/sigign"
cat > "$d/stdin"
echo "stock stdout"
echo "stock stderr" >&2
exit 7
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "record"
    record.mkdir()
    script = tmp_path / "remotes" / "datastore" / "downloader.sh.orig"
    script.parent.mkdir(parents=True)
    script.write_text(STAND_IN.format(record=record), encoding="utf-8")
    script.chmod(0o755)
    return script, record


def read_environ(path: Path) -> dict[bytes, bytes]:
    return dict(item.split(b"=", 1) for item in path.read_bytes().split(b"\0") if item)


ARGV_CASES = [
    ["-m", "0123abc", "--limit", "1M", "https://example.invalid/a b.qcow2", "/var/tmp/x"],
    ["-c", "1024", "/var/lib/one/datastores/1/abc", "-"],
    ["--nodecomp", "--noretry", "ssh://host:/path/to/it's here", "-"],
    ["rbd://host/pool/img", "-", "--sha1", "x"],
    ["--no-such-option", "restic://x"],
]


@pytest.mark.parametrize("argv", ARGV_CASES)
def test_other_sources_reach_the_original_unchanged(
    stand_in: tuple[Path, Path], argv: list[str]
) -> None:
    script, record = stand_in
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C",  # the interpreter coerces this locale: the original must not see it
        "DRV_ACTION": base64.b64encode(b"<DS_DRIVER_ACTION_DATA/>").decode(),
        "ODD": "spaces and\nnewline",
        dl.STOCK_ENV: str(script),
    }
    proc = run_downloader(*argv, env=env, stdin=b"bytes on stdin\0\n")
    assert proc.returncode == 7
    assert proc.stdout == b"stock stdout\n"
    assert proc.stderr == b"stock stderr\n"
    assert (record / "argv").read_bytes().split(b"\0")[:-1] == [
        os.fsencode(script),
        *map(os.fsencode, argv),
    ]
    assert read_environ(record / "environ") == {k.encode(): v.encode() for k, v in env.items()}
    assert (record / "stdin").read_bytes() == b"bytes on stdin\0\n"
    # signal dispositions as when the original runs directly (SIGPIPE not left ignored)
    direct = record / "direct"
    direct.mkdir()
    script2 = record / "direct.sh"
    script2.write_text(STAND_IN.format(record=direct), encoding="utf-8")
    script2.chmod(0o755)
    subprocess.run([str(script2)], input=b"", capture_output=True, timeout=TIMEOUT_S, check=False)
    assert (record / "sigign").read_text() == (direct / "sigign").read_text()


def test_original_found_in_the_installation(tmp_path: Path, stand_in: tuple[Path, Path]) -> None:
    script, record = stand_in
    ours = script.parent / "downloader.sh"
    ours.write_text('#!/bin/sh\n# onemarket: installed by install.sh\nexec false "$@"\n')
    ours.chmod(0o755)
    # ONE_LOCATION layout: ONE_LOCATION/var/remotes/datastore
    one = tmp_path / "one"
    (one / "var").mkdir(parents=True)
    (one / "var" / "remotes").symlink_to(script.parent.parent)
    env = {"PATH": os.environ.get("PATH", ""), "ONE_LOCATION": str(one)}
    proc = run_downloader("/some/file", "-", env=env)
    assert proc.returncode == 7, proc.stderr
    assert (record / "argv").read_bytes().split(b"\0")[1:3] == [b"/some/file", b"-"]


def test_missing_original_is_one_line(tmp_path: Path) -> None:
    datastore = tmp_path / "var" / "remotes" / "datastore"
    datastore.mkdir(parents=True)
    ours = datastore / "downloader.sh"  # only our wrapper: must not run itself in a loop
    ours.write_text('#!/bin/sh\n# onemarket: installed by install.sh\nexec false "$@"\n')
    ours.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", ""), "ONE_LOCATION": str(tmp_path)}
    line = one_line_error(run_downloader("http://h/f", "-", env=env))
    assert "stock datastore downloader" in line and "not installed" in line


# ---------------------------------------------------------------------------------------------
# DRV_ACTION


def market_attrs(endpoint: str, access_key: str, secret_key: str, **extra: str) -> dict[str, str]:
    """The TEMPLATE of an S3 market on an S3-compatible endpoint (Ceph RGW)."""
    return {
        "ACCESS_KEY_ID": access_key,
        "SECRET_ACCESS_KEY": secret_key,
        "BUCKET": BUCKET,
        "REGION": "default",
        "ENDPOINT": endpoint,
        "AWS": "no",
        "FORCE_PATH_STYLE": "YES",
        "SIGNATURE_VERSION": "v4",
        "APP_PREFIX": "dl",
        **extra,
    }


def drv_action(attrs: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    """DRV_ACTION as oned builds it for the cp of an exported app: base64 of
    ``<DS_DRIVER_ACTION_DATA>`` with IMAGE, DATASTORE, then the MARKETPLACE (credentials
    included), in that order (ImageManager::format_message)."""
    tmpl = {k: v for k, v in attrs.items() if k not in drop}
    doc = (
        "<DS_DRIVER_ACTION_DATA>"
        + payloads.image_xml(id=20, name="exported", source="", template={"FROM_APP": "3"})
        + payloads.datastore_xml()
        + payloads.market_xml("s3", tmpl, name="rgw market")
        + "</DS_DRIVER_ACTION_DATA>"
    )
    return payloads.b64(doc)


def env_with(action: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.pop("DRV_ACTION", None)
    if action is not None:
        env["DRV_ACTION"] = action
    return env


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (None, "DRV_ACTION is not set"),
        ("%%%", "not valid base64"),
        (
            base64.b64encode(b"<DS_DRIVER_ACTION_DATA><IMAGE/></DS_DRIVER_ACTION_DATA>").decode(),
            "has no MARKETPLACE",
        ),
        (
            drv_action(
                market_attrs("http://127.0.0.1:1", "AK", "SECRETSECRET"),
                drop=("SECRET_ACCESS_KEY",),
            ),
            "missing required attribute SECRET_ACCESS_KEY",
        ),
        (
            drv_action(market_attrs("ftp://x", "AK", "SECRETSECRET")),
            "ENDPOINT must be an http(s) URL",
        ),
        (
            drv_action(market_attrs("http://[::1:9000", "AK", "SECRETSECRET")),
            "ENDPOINT is not a valid URL (unbalanced",
        ),
    ],
)
def test_market_problems_are_one_line(action: str | None, expected: str) -> None:
    line = one_line_error(run_downloader("s3://apps/k", "-", env=env_with(action)))
    assert expected in line
    assert "SECRETSECRET" not in line


def test_unreachable_endpoint(tmp_path: Path) -> None:
    action = drv_action(market_attrs(f"http://127.0.0.1:{free_port()}", "AK", "SECRETSECRET"))
    proc = run_downloader("-o", "s3://apps/k", str(tmp_path / "x"), env=env_with(action))
    line = one_line_error(proc)
    assert "cannot reach S3" in line
    assert "SECRETSECRET" not in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# against the real Ceph RGW


class CuttingProxy:
    """A loopback TCP proxy to ``port`` whose first connection is cut after ``cut`` bytes from
    the server: a connection dropped in the middle of a download."""

    def __init__(self, port: int, cut: int) -> None:
        self.port, self.cut = port, cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            limit = self.cut if self.connections == 1 else None
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)


def import_app(rgw: Any, tmp_path: Path, data: bytes, app_id: int) -> str:
    """Our s3 import of ``data`` as app ``app_id`` into the RGW market; returns its SOURCE."""
    from onemarket.action import decode_action
    from onemarket.backends.base import Context, ImportRequest
    from onemarket.backends.s3 import S3Backend
    from onemarket.installation import Installation

    src = tmp_path / f"app-{app_id}.img"
    src.write_bytes(data)
    action = decode_action(
        payloads.import_payload(
            "s3",
            market_attrs(rgw.endpoint, rgw.access_key, rgw.secret_key),
            app=payloads.app_xml(id=app_id, name=f"app-{app_id}"),
            import_info=payloads.import_info_xml(
                str(src), md5=hashlib.md5(data).hexdigest(), size_mb=1
            ),
        )
    )
    backend = S3Backend(action.market, Context(installation=Installation.detect()))
    result = backend.import_app(
        ImportRequest(app=action.require_app(), source=action.require_import_info())
    )
    src.unlink()
    return result.source


@pytest.fixture(scope="module")
def apps(rgw: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Apps imported once for the RGW tests: a plain image and a gzip-compressed one."""
    tmp = tmp_path_factory.mktemp("apps")
    plain = os.urandom(3 << 20) + b"tail"
    packed_payload = (b"compressible disk block " * 200_000) + os.urandom(1000)
    packed = gzip.compress(packed_payload, compresslevel=1)
    client = raw_client(rgw)
    return {
        "client": client,
        "rgw": rgw,
        "plain": (import_app(rgw, tmp, plain, 9001), plain),
        "gzip": (import_app(rgw, tmp, packed, 9002), packed, packed_payload),
        "env": env_with(drv_action(market_attrs(rgw.endpoint, rgw.access_key, rgw.secret_key))),
    }


def test_rgw_download_to_a_file_and_to_stdout(apps: dict[str, Any], tmp_path: Path) -> None:
    source, data = apps["plain"]
    assert source.startswith(f"s3://{BUCKET}/dl-")
    dest = tmp_path / "image"
    proc = run_downloader(source, str(dest), env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == (b"", b"")
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]
    proc = run_downloader(source, "-", env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    assert proc.stderr == b""


def test_rgw_rate_limited_download(apps: dict[str, Any]) -> None:
    source, data = apps["plain"]
    proc = run_downloader("--limit", "64M", source, "-", env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data


def test_rgw_reader_closing_stdout_early(apps: dict[str, Any]) -> None:
    """``downloader.sh ... - | head -c 10``: one error line, no traceback, no noise at exit."""
    source, data = apps["plain"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "onemarket.downloader", source, "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=apps["env"],
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == data[:10]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT_S) == dl.EXIT_FAILURE
    assert err.splitlines() == failure_lines("ERROR: standard output closed by its reader")


@pytest.mark.parametrize(
    ("signum", "reason"),
    [
        (signal.SIGTERM, "SIGTERM (action time limit, driver shutdown or kill)"),
        (signal.SIGHUP, "SIGHUP (terminal or ssh session closed)"),
    ],
)
def test_rgw_download_stopped_by_sigterm(
    apps: dict[str, Any], tmp_path: Path, signum: int, reason: str
) -> None:
    """The datastore action's time limit (SIGTERM) or a dropped session (SIGHUP) leaves no
    partial file behind."""
    source, _ = apps["plain"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "onemarket.downloader", "-l", "256k", source, str(tmp_path / "i")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=apps["env"],
    )
    for _ in range(600):  # bounded wait (60 s) for the download to start writing
        if list(tmp_path.iterdir()) or proc.poll() is not None:
            break
        threading.Event().wait(0.1)
    assert [p.name.endswith(".part") for p in tmp_path.iterdir()] == [True]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == dl.EXIT_FAILURE
    assert out == b""
    assert err.decode().splitlines() == failure_lines(f"ERROR: s3:// download stopped by {reason}")
    assert list(tmp_path.iterdir()) == []


def test_rgw_md5_right_and_wrong(apps: dict[str, Any], tmp_path: Path) -> None:
    source, data = apps["plain"]
    md5 = hashlib.md5(data).hexdigest()
    dest = tmp_path / "image"
    proc = run_downloader("--md5", md5, source, str(dest), env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == data
    proc = run_downloader("-m", "0" * 32, source, str(dest), env=apps["env"])
    line = one_line_error(proc)
    assert "MD5 mismatch" in line and md5 in line
    assert list(tmp_path.iterdir()) == []  # the destination is removed
    sha1 = hashlib.sha1(data).hexdigest()
    proc = run_downloader("--md5", md5, "--sha1", sha1, source, "-", env=apps["env"])
    assert proc.returncode == 0 and proc.stdout == data
    # both are checked when the datastore passes both (the stock script checks only the last)
    proc = run_downloader("--md5", "0" * 32, "--sha1", sha1, source, str(dest), env=apps["env"])
    assert "MD5 mismatch" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_rgw_partial_read(apps: dict[str, Any]) -> None:
    source, data = apps["plain"]
    proc = run_downloader("-c", "1000", source, "-", env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data[:1000]
    # a probe of a compressed image reads the decompressed bytes
    gz_source, _, payload = apps["gzip"]
    proc = run_downloader("--max-size", "65536", gz_source, "-", env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == payload[:65536]


def test_rgw_gzip_object_decompressed(apps: dict[str, Any], tmp_path: Path) -> None:
    source, packed, payload = apps["gzip"]
    dest = tmp_path / "image"
    proc = run_downloader(
        "--md5", hashlib.md5(packed).hexdigest(), source, str(dest), env=apps["env"]
    )
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == payload
    proc = run_downloader("-n", source, "-", env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == packed


def test_rgw_dropped_connection_resumed(apps: dict[str, Any], tmp_path: Path) -> None:
    source, data = apps["plain"]
    rgw = apps["rgw"]
    proxy = CuttingProxy(rgw.rgw_port, cut=1 << 20)
    try:
        env = env_with(drv_action(market_attrs(proxy.endpoint, rgw.access_key, rgw.secret_key)))
        dest = tmp_path / "image"
        proc = run_downloader("-m", hashlib.md5(data).hexdigest(), source, str(dest), env=env)
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == data
    assert proxy.connections >= 2
    warnings = proc.stderr.decode().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("WARN: ")
    assert "connection lost at byte" in warnings[0] and "resuming" in warnings[0]


def test_rgw_dropped_connection_without_retries(apps: dict[str, Any], tmp_path: Path) -> None:
    source, _ = apps["plain"]
    rgw = apps["rgw"]
    proxy = CuttingProxy(rgw.rgw_port, cut=1 << 20)
    try:
        env = env_with(drv_action(market_attrs(proxy.endpoint, rgw.access_key, rgw.secret_key)))
        proc = run_downloader("--noretry", source, str(tmp_path / "image"), env=env)
    finally:
        proxy.close()
    assert "connection lost at byte" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_rgw_wrong_credentials(apps: dict[str, Any]) -> None:
    source, _ = apps["plain"]
    rgw = apps["rgw"]
    wrong = "WrongSecretWrongSecretWrongSecret0000000"
    for key, secret in ((rgw.access_key, wrong), ("NOSUCHKEY00000000000", wrong)):
        env = env_with(drv_action(market_attrs(rgw.endpoint, key, secret)))
        line = one_line_error(run_downloader(source, "-", env=env))
        assert "rejected the credentials" in line
        assert wrong not in line


def test_rgw_no_such_object_and_bucket(apps: dict[str, Any]) -> None:
    line = one_line_error(run_downloader(f"s3://{BUCKET}/dl-missing", "-", env=apps["env"]))
    assert "no such object" in line
    line = one_line_error(run_downloader("s3://no-such-bucket-here/k", "-", env=apps["env"]))
    assert "no such bucket" in line


def test_rgw_access_denied(apps: dict[str, Any]) -> None:
    """Another user of the same RGW has no access to our bucket."""
    from tests.servers.rgw import OTHER_ACCESS_KEY, OTHER_SECRET_KEY

    rgw = apps["rgw"]
    with contextlib.suppress(RuntimeError):  # created already by another test of the session
        rgw.create_user("downloader-other", OTHER_ACCESS_KEY, OTHER_SECRET_KEY)
    source, _ = apps["plain"]
    env = env_with(drv_action(market_attrs(rgw.endpoint, OTHER_ACCESS_KEY, OTHER_SECRET_KEY)))
    line = one_line_error(run_downloader(source, "-", env=env))
    assert "access denied" in line
    assert OTHER_SECRET_KEY not in line


def test_installed_wrapper_end_to_end(apps: dict[str, Any], tmp_path: Path) -> None:
    """install.sh over a ONE_LOCATION holding a stock downloader.sh: the datastore scripts'
    ``downloader.sh`` now reads s3:// itself and still hands everything else to the original."""
    root = Path(__file__).resolve().parents[1]
    one = tmp_path / "one"
    record = tmp_path / "record"
    record.mkdir()
    stock = one / "var" / "remotes" / "datastore" / "downloader.sh"
    stock.parent.mkdir(parents=True)
    stock.write_text(STAND_IN.format(record=record), encoding="utf-8")
    stock.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(root / "install.sh"), "-d", str(one), "-P", sys.executable],
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    env = {**apps["env"], "ONE_LOCATION": str(one)}
    env.pop(dl.STOCK_ENV, None)
    run = subprocess.run(
        [str(stock), "--md5", "abc", "http://example.invalid/img", str(tmp_path / "x")],
        capture_output=True,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 7, run.stderr
    assert (record / "argv").read_bytes().split(b"\0")[:-1] == [
        os.fsencode(stock.with_name("downloader.sh.orig")),
        b"--md5",
        b"abc",
        b"http://example.invalid/img",
        os.fsencode(tmp_path / "x"),
    ]
    source, data = apps["plain"]
    run = subprocess.run(
        [str(stock), "--md5", hashlib.md5(data).hexdigest(), source, "-"],
        capture_output=True,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == data


def test_rgw_objects_from_elsewhere(apps: dict[str, Any], tmp_path: Path) -> None:
    """Objects not written by our importer: no metadata (nothing to verify but -m), an empty
    object, and metadata that disagrees with the bytes (the download fails, nothing left)."""
    client = apps["client"]
    data = os.urandom(100_000)
    client.put_object(Bucket=BUCKET, Key="foreign-plain", Body=data)
    client.put_object(Bucket=BUCKET, Key="foreign-empty", Body=b"")
    client.put_object(
        Bucket=BUCKET,
        Key="foreign-corrupt",
        Body=data,
        Metadata={"md5": hashlib.md5(data).hexdigest(), "sha256": "ab" * 32},
    )
    dest = tmp_path / "image"
    proc = run_downloader(f"s3://{BUCKET}/foreign-plain", str(dest), env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == data
    proc = run_downloader(f"s3://{BUCKET}/foreign-empty", str(dest), env=apps["env"])
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == b""
    proc = run_downloader(f"s3://{BUCKET}/foreign-corrupt", str(dest), env=apps["env"])
    assert "SHA256 mismatch (object metadata sha256 abab" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_rgw_legacy_signature(apps: dict[str, Any]) -> None:
    """SIGNATURE_VERSION=s3 (SigV2), which old gateways need and RGW still accepts."""
    rgw = apps["rgw"]
    source, data = apps["plain"]
    attrs = market_attrs(rgw.endpoint, rgw.access_key, rgw.secret_key, SIGNATURE_VERSION="s3")
    proc = run_downloader(source, "-", env=env_with(drv_action(attrs)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data


def test_resume_refused_when_the_server_ignores_the_range(httpd: Any, tmp_path: Path) -> None:
    """An S3-compatible server (or proxy) answering a resume's ranged GET with the whole
    object: splicing it in would corrupt the image silently when no checksum is known."""
    data = os.urandom(3 << 20)
    calls = {"n": 0}

    def no_ranges(h: Any) -> None:
        calls["n"] += 1
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        h.end_headers()
        if calls["n"] == 1:
            h.wfile.write(data[: 1 << 20])  # then the connection drops
            h.close_connection = True
            return
        h.wfile.write(data)

    httpd.routes["/fake-bucket/obj"] = no_ranges
    env = env_with(drv_action(market_attrs(httpd.url, "AKIDEXAMPLE", "fakeSecretKey0000000000")))
    dest = tmp_path / "image"
    proc = run_downloader("s3://fake-bucket/obj", str(dest), env=env)
    assert proc.returncode == dl.EXIT_FAILURE
    lines = proc.stderr.decode().splitlines()
    assert lines[0].startswith("WARN: ") and "resuming" in lines[0]
    assert lines[1:] == failure_lines(
        f"ERROR: download of s3://fake-bucket/obj: S3 at {httpd.url} ignored the range "
        "asked to resume at byte 1048576"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The failure reaching `oneimage show` (issue 12): what oned's datastore driver does with stderr

_LOG_LINE_RE = re.compile(r"^(ERROR|INFO|WARN|DEBUG):\s+(\d+)?\s*(.*)$")


def stock_cp_stderr(downloader_stderr: str, src: str, dst: str) -> str:
    """The datastore ``cp`` script's stderr around a failed downloader: multiline_exec_and_log
    logs ``Command "..." failed: $EXEC_LOG_ERR`` (the downloader's stderr, so its first line
    lands on the log line) then prints the error message (one-7.0:
    src/mad/sh/scripts_common.sh:275-296, src/datastore_mad/remotes/fs/cp:179)."""
    captured = downloader_stderr.rstrip("\n")  # $(...) drops the trailing newlines
    return (
        f'ERROR: cp: Command "set -e -o pipefail; downloader.sh {src} {dst}" failed: '
        f"{captured}\nError copying {src} to {dst}\n"
    )


def image_error_7x(cp_stderr: str) -> str:
    """7.x get_info_from_execution (one-7.0: src/mad/ruby/DriverExecHelper.rb:167-210): log
    lines are sent as LOG, every other line is stripped and appended, without a separator; oned
    prefixes the result (one-7.0: src/image/ImageManagerProtocol.cc:132, ImageManager::_cp)."""
    info = "".join(
        ln.strip() for ln in cp_stderr.splitlines() if not _LOG_LINE_RE.match(ln.strip())
    )
    return f"Error copying image in the datastore: {info}"


def image_error_610(cp_stderr: str) -> str:
    """6.10 get_error_message (one-6.10: src/mad/ruby/CommandManager.rb:97-101): all of stderr,
    newlines turned into spaces."""
    return f"Error copying image in the datastore: {cp_stderr.replace(chr(10), ' ').strip()}"


@pytest.mark.parametrize("version", ["7.0.1", "7.4.0", "6.10.3"])
def test_failure_cause_reaches_the_image_error_message(tmp_path: Path, version: str) -> None:
    """A failed export names its cause in `oneimage show`, not only in oned.log: before, the
    single ``ERROR:`` line was folded into the cp script's log line and 7.x kept only
    "Error copying s3://... to ..."."""
    (tmp_path / "var" / "remotes").mkdir(parents=True)
    (tmp_path / "var" / "remotes" / "VERSION").write_text(version + "\n")
    env = env_with(None)
    env["ONE_LOCATION"] = str(tmp_path)
    proc = run_downloader("s3://bucket/key", str(tmp_path / "img"), env=env)
    assert proc.returncode == dl.EXIT_FAILURE
    stderr = proc.stderr.decode()
    cause = "DRV_ACTION is not set"
    cp = stock_cp_stderr(stderr, "s3://bucket/key", "/var/lib/one/datastores/1/abc")
    if version.startswith("7."):
        message = image_error_7x(cp)
        assert message.startswith(f"Error copying image in the datastore: {cause}")
        assert message.endswith(";Error copying s3://bucket/key to /var/lib/one/datastores/1/abc")
    else:
        assert stderr.splitlines() == [ln for ln in stderr.splitlines() if ln.startswith("ERROR:")]
        message = image_error_610(cp)
        assert message.count(cause) == 1
