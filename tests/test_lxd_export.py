"""lxd:// exports end to end: real-bytes simplestreams catalogs on a loopback nginx, the
downloader run without privileges, the built disk read back with debugfs (never mounted)."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from onemarket import downloader as dl
from onemarket.transfer.local import owner_tag

from tests.servers import need, need_program
from tests.test_containerdisk import MTIME, member
from tests.tools import gen_images_json

TIMEOUT_S = 120
"""Bound on every downloader run."""
SIZE_MB = 64
_UNPRIVILEGED_TRIES = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"],
    # the interpreter may live where nobody cannot read it (a pyenv under /root): then uid 0
    # without a single capability (no chown, mknod, mount, DAC override, no sudo)
    ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"],
)


# ---------------------------------------------------------------------------------------------
# fixtures: an unprivileged runner, a world-writable work folder, the served catalog


@pytest.fixture(scope="module")
def unprivileged() -> list[str]:
    """A command prefix running a program with no privilege; the test proves it (mknod fails)."""
    need_program("setpriv", "util-linux")
    need_program("mke2fs", "e2fsprogs")
    need_program("debugfs", "e2fsprogs")
    probe = "import os, stat; os.mknod('/dev/null-probe', stat.S_IFCHR | 0o600, os.makedev(1, 3))"
    if os.geteuid() != 0:
        return []  # already unprivileged
    for prefix in _UNPRIVILEGED_TRIES:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", probe], capture_output=True, timeout=30, check=False
        )
        if b"PermissionError" in proc.stderr or b"Operation not permitted" in proc.stderr:
            return prefix
    need(False, "cannot drop privileges here (setpriv failed)")
    return []


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder the unprivileged downloader can write (tmp_path's parents are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lxd-export-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


CAPABILITY = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
"""security.capability of cap_net_raw+ep (what ping carries)."""


def special_rootfs() -> bytes:
    """A rootfs with what an unprivileged unpack cannot reproduce in a folder: other owners,
    setuid/setgid/sticky, unreadable files, read-only folders, devices, FIFO, hard link, xattr."""
    pax_cap = {"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape")}
    members = [
        member("./", tarfile.DIRTYPE, mode=0o755),
        member("./bin", tarfile.SYMTYPE, linkname="usr/bin", mode=0o777),
        member("./usr/", tarfile.DIRTYPE, mode=0o755),
        member("./usr/bin/", tarfile.DIRTYPE, mode=0o755),
        member("./usr/bin/passwd", mode=0o4755, data=b"#!/bin/sh\n"),
        member("./usr/bin/ping", mode=0o755, data=b"ping\n", pax_headers=pax_cap),
        member("./usr/bin/ping6", tarfile.LNKTYPE, linkname="./usr/bin/ping", mode=0o755),
        member("./dev/", tarfile.DIRTYPE, mode=0o755),
        member("./dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("./dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=8, devminor=0),
        member("./dev/initctl", tarfile.FIFOTYPE, mode=0o600),
        member("./home/", tarfile.DIRTYPE, mode=0o755),
        member("./home/user/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000),
        member("./home/user/secret", mode=0o000, uid=1000, gid=1000, data=b"s3cret"),
        member("./home/user/link", tarfile.SYMTYPE, linkname="secret", uid=1000, gid=1000),
        member("./tmp/", tarfile.DIRTYPE, mode=0o1777),
        member("./etc/", tarfile.DIRTYPE, mode=0o555),
        member("./etc/shadow", mode=0o640, gid=42, data=b"root:*:19000::::::\n"),
        member("./etc/os-release", mode=0o644, data=b"ID=debian\n"),
        member("./var/", tarfile.DIRTYPE, mode=0o755),
        member("./var/mail/", tarfile.DIRTYPE, mode=0o2775, gid=8),
        member("./with space", mode=0o600, uid=7, data=b"x"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ)


def fake_deb() -> bytes:
    """A stand-in for one-context_*.deb: a unit to enable, a script, dependencies."""
    unit = b"[Unit]\nDescription=fake\n[Service]\nExecStart=/usr/sbin/one-contextd\n"
    unit += b"[Install]\nWantedBy=multi-user.target\n"

    def tar_of(entries: list[tuple[str, bytes, int]], dirs: list[str]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for d in dirs:
                info, _ = member(d, tarfile.DIRTYPE, mode=0o755)
                tar.addfile(info)
            for name, data, mode in entries:
                info, _ = member(name, mode=mode, data=data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    data = tar_of(
        [
            ("./usr/sbin/one-contextd", b"#!/bin/bash\necho context\n", 0o755),
            ("./lib/systemd/system/one-context.service", unit, 0o644),
            ("./etc/one-context.d/loc-10-network", b"#!/bin/bash\n", 0o755),
        ],
        [
            "./usr/",
            "./usr/sbin/",
            "./lib/",
            "./lib/systemd/",
            "./lib/systemd/system/",
            "./etc/",
            "./etc/one-context.d/",
        ],
    )
    control_text = b"Package: one-context\nVersion: 6.10.0-1\nDepends: util-linux, bash, curl\n"
    control = tar_of([("./control", control_text, 0o644)], [])
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, body in (
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", control),
        ("data.tar.xz", data),
    ):
        out.write(f"{name:<16}{MTIME:<12}0     0     100644  {len(body):<10}`\n".encode())
        out.write(body + (b"\n" if len(body) % 2 else b""))
    return out.getvalue()


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's real-bytes catalog, plus one product whose rootfs is special_rootfs()."""
    out = tmp_path_factory.mktemp("lxcsrv")
    gen_images_json.main(
        [
            "--real-bytes",
            "--only",
            "ubuntu:jammy:amd64:default|alpine:3.19:amd64:default",
            "--versions",
            "1",
            "-o",
            str(out),
        ]
    )
    images = out / "streams" / "v1" / "images.json"
    catalog = json.loads(images.read_text())
    rel = "images/debian/bookworm/amd64/special/20250110_16:00/rootfs.tar.xz"
    data = special_rootfs()
    (out / rel).parent.mkdir(parents=True)
    (out / rel).write_bytes(data)
    catalog["products"]["debian:bookworm:amd64:special"] = {
        "aliases": "debian/bookworm/special",
        "arch": "amd64",
        "os": "Debian",
        "release": "bookworm",
        "release_title": "bookworm",
        "requirements": {},
        "variant": "special",
        "versions": {
            "20250110_16:00": {
                "items": {
                    "root.tar.xz": {
                        "ftype": "root.tar.xz",
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "path": rel,
                    }
                }
            }
        },
    }
    images.write_text(json.dumps(catalog) + "\n")
    return out


@pytest.fixture
def server(nginx: Any, catalog_dir: Path) -> Any:
    """nginx serving a private copy of the catalog (tests may tamper with it)."""
    shutil.rmtree(nginx.public_dir)
    shutil.copytree(catalog_dir, nginx.public_dir)
    return nginx


def rootfs_path(server: Any, product: str) -> str:
    catalog = json.loads((server.public_dir / "streams/v1/images.json").read_text())
    versions = catalog["products"][product]["versions"]
    return versions[max(versions)]["items"]["root.tar.xz"]["path"]


def publish(server: Any, product: str, data: bytes) -> None:
    """Replace a product's rootfs, its catalog sha256 and size following."""
    (server.public_dir / rootfs_path(server, product)).write_bytes(data)
    images = server.public_dir / "streams/v1/images.json"
    catalog = json.loads(images.read_text())
    for version in catalog["products"][product]["versions"].values():
        version["items"]["root.tar.xz"].update(
            sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )
    images.write_text(json.dumps(catalog))


def source_of(server: Any, product: str, fmt: str = "raw", fs: str = "ext4") -> str:
    return (
        f"lxd://{server.base_url}/{rootfs_path(server, product)}?size={SIZE_MB}"
        f"&filesystem={fs}&format={fmt}"
    )


def env_for(work: Path, version: str = "7.0.0", **extra: str) -> dict[str, str]:
    """ONE_LOCATION in the work folder: its catalog cache and remotes/VERSION, nothing of the
    host's /var/lib/one."""
    one = work / "one"
    (one / "var" / "remotes").mkdir(parents=True, exist_ok=True)
    (one / "var" / "remotes" / "VERSION").write_text(version + "\n")
    for p in (one, one / "var", one / "var" / "remotes"):
        p.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("DRV_ACTION", "TMPDIR")}
    env.update(ONE_LOCATION=str(one), HOME=str(work), TMPDIR=str(work), **extra)
    env["PYTHONPATH"] = str(Path(dl.__file__).resolve().parents[1])
    return env


def run(prefix: list[str], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "onemarket.downloader", *args],
        capture_output=True,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )


def debugfs(image: Path, command: str) -> str:
    proc = subprocess.run(
        [need_program("debugfs", "e2fsprogs"), "-R", command, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout


def listing(image: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode with type bits, uid, gid, ls -l name field) of every entry, read by debugfs."""
    out: dict[str, tuple[int, int, int, str]] = {}
    todo = ["/"]
    while todo:
        folder = todo.pop()
        quoted = '"' + folder + '"'
        for line in debugfs(image, f"ls -l {quoted}").splitlines():
            parts = line.split(None, 8)
            if len(parts) < 9 or parts[8] in (".", ".."):
                continue
            ino, mode, _links, uid, gid = parts[0], int(parts[1], 8), parts[2], parts[3], parts[4]
            del ino
            path = folder.rstrip("/") + "/" + parts[8]
            out[path] = (mode, int(uid), int(gid), parts[8])
            if stat.S_ISDIR(mode) and path != "/lost+found":
                todo.append(path)
    return out


def expected_from_tarball(data: bytes) -> dict[str, tuple[int, int, int]]:
    """path -> (mode, uid, gid) as the tarball gives them (hard links: their target's)."""
    want: dict[str, tuple[int, int, int]] = {}
    kinds = {
        tarfile.DIRTYPE: stat.S_IFDIR,
        tarfile.SYMTYPE: stat.S_IFLNK,
        tarfile.CHRTYPE: stat.S_IFCHR,
        tarfile.BLKTYPE: stat.S_IFBLK,
        tarfile.FIFOTYPE: stat.S_IFIFO,
        tarfile.REGTYPE: stat.S_IFREG,
    }
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            path = "/" + m.name.lstrip("./").rstrip("/")
            if path == "/":
                continue
            if m.islnk():
                want[path] = want["/" + m.linkname.lstrip("./")]
                continue
            mode = 0o777 if m.issym() else m.mode
            want[path] = (kinds[m.type] | mode, m.uid, m.gid)
    return want


def assert_disk_matches(image: Path, tarball: bytes) -> None:
    got = listing(image)
    for path, (mode, uid, gid) in expected_from_tarball(tarball).items():
        assert path in got, f"{path} missing from the disk"
        assert got[path][:3] == (mode, uid, gid), (path, oct(got[path][0]), oct(mode))


def ext_image(path: Path) -> None:
    """A clean ext4 (e2fsck -n finds nothing) of SIZE_MB."""
    proc = subprocess.run(
        [need_program("e2fsck", "e2fsprogs"), "-fn", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# tests


def test_generator_rootfs_becomes_a_faithful_disk(
    server: Any, unprivileged: list[str], work: Path
) -> None:
    """The acceptance case: a catalog never seen, an unprivileged user, a raw ext4 whose files,
    owners and modes are the tarball's; the context package's files and service link added."""
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "one-context_6.10.0-1.deb").write_bytes(fake_deb())
    (ctx / "one-context-6.10.0-1.el9.noarch.rpm").write_bytes(b"not for debian")
    dest = work / "ds" / "0123abcd"
    dest.parent.mkdir(mode=0o777)
    dest.parent.chmod(0o777)
    source = source_of(server, "ubuntu:jammy:amd64:default")
    proc = run(
        unprivileged, source, str(dest), env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES=str(ctx))
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert "WARN: " in err and "util-linux, bash, curl" in err and "sudo" in err
    assert sorted(p.name for p in dest.parent.iterdir()) == ["0123abcd"]  # no leftovers
    assert dest.stat().st_size == SIZE_MB << 20
    if "--reuid=65534" in unprivileged:
        assert dest.stat().st_uid == 65534  # written by nobody: the build needed no privilege
    ext_image(dest)
    tarball = (server.public_dir / rootfs_path(server, "ubuntu:jammy:amd64:default")).read_bytes()
    assert_disk_matches(dest, tarball)
    assert "hello from ubuntu jammy" in debugfs(dest, "cat /usr/bin/hello")
    got = listing(dest)
    assert got["/usr/sbin/one-contextd"][:3] == (stat.S_IFREG | 0o755, 0, 0)
    link = "/etc/systemd/system/multi-user.target.wants/one-context.service"
    assert stat.S_ISLNK(got[link][0])
    assert "/lib/systemd/system/one-context.service" in debugfs(dest, f"stat {link}")


def test_owners_devices_xattrs_and_qcow2(server: Any, unprivileged: list[str], work: Path) -> None:
    """Everything a folder cannot hold for an unprivileged user, and the qcow2 format."""
    need_program("qemu-img", "qemu-utils")
    dest = work / "disk.qcow2"
    proc = run(
        unprivileged,
        source_of(server, "debian:bookworm:amd64:special", "qcow2"),
        str(dest),
        env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none"),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(dest)],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", SIZE_MB << 20)
    raw = work / "back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(dest), str(raw)], check=True, timeout=60
    )
    ext_image(raw)
    assert_disk_matches(raw, special_rootfs())
    null = debugfs(raw, "stat /dev/null")
    assert "character special" in null and "Device major/minor number: 01:03" in null
    assert "block special" in debugfs(raw, "stat /dev/sda")
    assert "security.capability (20)" in debugfs(raw, "ea_list /usr/bin/ping")
    got = listing(raw)
    assert got["/usr/bin/ping"][0] == got["/usr/bin/ping6"][0]
    assert (
        debugfs(raw, "stat /usr/bin/ping").split()[1]
        == debugfs(raw, "stat /usr/bin/ping6").split()[1]
    )  # one inode
    assert "s3cret" in debugfs(raw, "cat /home/user/secret")


def test_image_to_stdout(server: Any, unprivileged: list[str], work: Path) -> None:
    """BRIDGE_LIST datastores read the image from the downloader's stdout (TO is ``-``)."""
    proc = run(
        unprivileged,
        source_of(server, "alpine:3.19:amd64:default"),
        "-",
        env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none"),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == SIZE_MB << 20
    image = work / "out.raw"
    image.write_bytes(proc.stdout)
    ext_image(image)
    assert "alpine" in debugfs(image, "cat /etc/os-release").lower()
    assert [p.name for p in work.iterdir() if p.name.startswith(".onemarket")] == []


def test_tampered_rootfs_is_refused_naming_sha256(
    server: Any, unprivileged: list[str], work: Path
) -> None:
    path = server.public_dir / rootfs_path(server, "ubuntu:jammy:amd64:default")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dest = work / "img"
    proc = run(
        unprivileged, source_of(server, "ubuntu:jammy:amd64:default"), str(dest), env=env_for(work)
    )
    assert proc.returncode == dl.EXIT_FAILURE
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    errors = [ln for ln in lines if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and "SHA256 mismatch" in errors[0], lines
    assert lines[-1] == errors[0][len("ERROR: ") :] + ";"  # the line oned's message keeps
    assert not dest.exists() and sorted(p.name for p in work.iterdir()) == ["one"]


def test_truncated_rootfs_is_refused(server: Any, unprivileged: list[str], work: Path) -> None:
    path = server.public_dir / rootfs_path(server, "alpine:3.19:amd64:default")
    path.write_bytes(path.read_bytes()[:-100])
    dest = work / "img"
    proc = run(
        unprivileged,
        "-o",
        source_of(server, "alpine:3.19:amd64:default"),
        str(dest),
        env=env_for(work),
    )
    assert proc.returncode == dl.EXIT_FAILURE
    assert "the catalog says" in proc.stderr.decode() and "truncated" in proc.stderr.decode()
    assert not dest.exists()


def test_unknown_rootfs_and_xfs(server: Any, work: Path) -> None:
    """Not in the catalog (an expired build): one line; xfs: refused before any download."""
    gone = (
        f"lxd://{server.base_url}/images/ubuntu/jammy/amd64/default/19990101_00:00/"
        "rootfs.tar.xz?size=64&filesystem=ext4&format=raw"
    )
    proc = run([], gone, str(work / "img"), env=env_for(work))
    assert proc.returncode == dl.EXIT_FAILURE
    assert "is not in the catalog" in proc.stderr.decode()
    proc = run(
        [],
        source_of(server, "alpine:3.19:amd64:default", fs="xfs"),
        str(work / "img"),
        env=env_for(work),
    )
    assert proc.returncode == dl.EXIT_FAILURE
    assert "filesystem=xfs cannot be built without root" in proc.stderr.decode()
    assert not (work / "img").exists()


def test_rootfs_larger_than_the_image(server: Any, work: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        info, data = member("./big", data=os.urandom(3 << 20))
        tar.addfile(info, io.BytesIO(data))
    publish(server, "ubuntu:jammy:amd64:default", buf.getvalue())
    src = source_of(server, "ubuntu:jammy:amd64:default").replace(f"size={SIZE_MB}", "size=2")
    proc = run([], src, str(work / "img"), env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none"))
    assert proc.returncode == dl.EXIT_FAILURE
    assert "does not fit a 2 MB ext4 file system" in proc.stderr.decode()
    assert not (work / "img").exists()


def test_context_package_from_a_release_document(server: Any, work: Path) -> None:
    """A URL source: a GitHub-style release document served on loopback (the default's form)."""
    (server.public_dir / "ctx").mkdir()
    (server.public_dir / "ctx" / "one-context_7.0.0-1.deb").write_bytes(fake_deb())
    release = {
        "assets": [{"browser_download_url": f"{server.base_url}/ctx/one-context_7.0.0-1.deb"}]
    }
    (server.public_dir / "release.json").write_text(json.dumps(release))
    dest = work / "img"
    proc = run(
        [],
        source_of(server, "ubuntu:jammy:amd64:default"),
        str(dest),
        env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES=f"{server.base_url}/release.json"),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert "one-context_7.0.0-1.deb" in proc.stderr.decode()
    assert "echo context" in debugfs(dest, "cat /usr/sbin/one-contextd")


def test_unsupported_distribution_gets_the_stock_note(server: Any, work: Path) -> None:
    dest = work / "img"
    ctx = work / "ctx"
    ctx.mkdir()
    proc = run(
        [],
        source_of(server, "debian:bookworm:amd64:special"),
        str(dest),
        env=env_for(work, ONE_MARKET_CONTEXT_PACKAGES=str(ctx)),
    )
    # debian is supported: an empty folder is a clear failure naming the suffix
    assert proc.returncode == dl.EXIT_FAILURE
    assert "no context package ending in deb" in proc.stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_stop_signals_leave_nothing(server: Any, work: Path, signum: int) -> None:
    """The action's time limit (SIGTERM) or a dropped session (SIGHUP) during a slow rootfs
    download: no image, no work folder. SIGKILL leaves the work folder: the next download
    removes it."""
    dest_dir = work / "ds"
    dest_dir.mkdir()
    publish(server, "alpine:3.19:amd64:default", os.urandom(8 << 20))
    env = env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, onemarket.downloader as d; "
            "import onemarket.lxdsource as l; l.DOWNLOAD_CHUNK_BYTES = 4096; "
            "import time; orig = l.save_verified\n"
            "def slow(r, *a, **k):\n"
            "    class R:\n"
            "        def read(self, n):\n"
            "            time.sleep(0.01); return r.read(4096)\n"
            "    return orig(R(), *a, **k)\n"
            "l.save_verified = slow\n"
            "sys.exit(d.main(sys.argv[1:]))",
            source_of(server, "alpine:3.19:amd64:default"),
            str(dest_dir / "img"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    for _ in range(600):  # bounded wait (60 s) for the work folder to hold the rootfs
        found = [p for p in dest_dir.iterdir() if (p / "rootfs.tar.xz").exists()]
        if found or proc.poll() is not None:
            break
        threading.Event().wait(0.1)
    assert found, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert out == b""
    if signum == signal.SIGKILL:
        assert [p.name for p in dest_dir.iterdir()] == [found[0].name]
        gone = "lxd://http://127.0.0.1:1/images/x/rootfs.tar.xz?size=8"  # fails, after the sweep
        proc2 = run([], "-o", gone, str(dest_dir / "other"), env=env)
        assert proc2.returncode == dl.EXIT_FAILURE
        assert f"removed {found[0]}, left by an earlier download" in proc2.stderr.decode()
    else:
        assert proc.returncode == dl.EXIT_FAILURE, err
    assert list(dest_dir.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed(work: Path) -> None:
    """SIGKILL skips every clean-up: the next run removes what a dead pid of this host left."""
    tag = owner_tag().rsplit("-", 1)[0]
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_dir = work / f".onemarket-lxd.{tag}-{dead.pid}.abcd1234"
    stale_dir.mkdir()
    (stale_dir / "rootfs.tar.xz").write_bytes(b"x")
    stale_part = work / f".img.{tag}-{dead.pid}.k2j4h5g6.part"
    stale_part.write_bytes(b"x")
    live = work / f".img.{tag}-{os.getpid()}.k2j4h5g6.part"
    live.write_bytes(b"x")
    other_host = work / f".img.otherhost-{dead.pid}.k2j4h5g6.part"
    other_host.write_bytes(b"x")
    removed = dl.remove_stale_leftovers(str(work / "new-image"), {"TMPDIR": str(work)})
    assert sorted(removed) == sorted({stale_dir, stale_part})
    assert sorted(p.name for p in work.iterdir()) == sorted([live.name, other_host.name])


FAKE_HELPER = """#!/bin/bash
# stands in for OpenNebula's create_container_image.sh: records what it was given
set -e
[ -f "$1/$2.raw" ] && [ -d "$1/$2" ] && tar tJf "$1/$2.$3" > "{record}.members"
printf '%s\\n' "$@" > "{record}.args"
cat > "{record}.stdin"
{tail}
"""


@pytest.mark.parametrize("helper_fails", [False, True])
def test_sudo_rule_runs_the_package_manager_as_stock(
    server: Any, work: Path, helper_fails: bool
) -> None:
    """Where ``sudo -n`` may run OpenNebula's root helper (root may, here), it gets the disk in
    its layout and the package-manager commands; a failure of it is one WARN, the rootless
    install stays."""
    need(os.geteuid() == 0 and shutil.which("sudo") is not None, "needs root and sudo")
    env = env_for(work, ONE_MARKET_CONTEXT_PACKAGES=str(work / "ctx"))
    (work / "ctx").mkdir()
    (work / "ctx" / "one-context_6.10.0-1.deb").write_bytes(fake_deb())
    record = work / "record"
    helper = Path(env["ONE_LOCATION"]) / "lib" / "sh" / "create_container_image.sh"
    helper.parent.mkdir(parents=True)
    tail = "echo 'mount: no loop device' >&2; exit 32" if helper_fails else "exit 0"
    helper.write_text(FAKE_HELPER.format(record=record, tail=tail))
    helper.chmod(0o755)
    dest = work / "img"
    proc = run([], source_of(server, "ubuntu:jammy:amd64:default"), str(dest), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (work / "record.args").exists(), proc.stderr.decode()
    args = (work / "record.args").read_text().split("\n")
    assert args[1:4] == ["chroot", "tar.xz", "/bin/sh"]
    assert (work / "record.members").read_text() == ""  # the disk is built: nothing to untar
    script = (work / "record.stdin").read_text()
    assert "apt-get install -y /root/one-context_6.10.0-1.deb" in script
    assert "$" not in script.replace("\\$", "")  # nothing the helper's heredoc would expand
    err = proc.stderr.decode()
    warnings = [ln for ln in err.splitlines() if ln.startswith("WARN: ")]
    if helper_fails:
        assert len(warnings) == 1 and "mount: no loop device" in warnings[0], err
    else:
        assert warnings == [] and "installed by the package manager" in err
    assert "echo context" in debugfs(dest, "cat /usr/sbin/one-contextd")


def test_dropped_connection_resumed_and_catalog_cached(
    httpd: Any, catalog_dir: Path, work: Path
) -> None:
    """The rootfs download resumes with a ranged GET where the connection dropped; a second
    export asks for the catalog with its validators (a 304, as the monitor's cache)."""
    catalog = (catalog_dir / "streams/v1/images.json").read_bytes()
    rel = json.loads(catalog)["products"]["alpine:3.19:amd64:default"]["versions"]
    item = rel[max(rel)]["items"]["root.tar.xz"]
    data = (catalog_dir / item["path"]).read_bytes()
    cut = {"done": False}

    def rootfs(h: Any) -> None:
        if cut["done"] or h.headers.get("Range"):
            httpd.serve_bytes(h, data)
            return
        cut["done"] = True
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", '"v1"')
        h.end_headers()
        h.wfile.write(data[:300])  # then the connection drops
        h.close_connection = True

    httpd.routes["/streams/v1/images.json"] = catalog
    httpd.routes["/" + item["path"]] = rootfs
    source = f"lxd://{httpd.url}/{item['path']}?size={SIZE_MB}&filesystem=ext4&format=raw"
    env = env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none")
    proc = run([], source, str(work / "img"), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "connection lost at byte 300" in proc.stderr.decode()
    ranges = [r.headers.get("Range") for r in httpd.requests if r.path == "/" + item["path"]]
    assert ranges == [None, "bytes=300-"]
    ext_image(work / "img")
    proc = run([], source, str(work / "img2"), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    catalog_gets = [r for r in httpd.requests if r.path == "/streams/v1/images.json"]
    assert len(catalog_gets) == 2 and "If-None-Match" in catalog_gets[1].headers


def test_export_reuses_the_monitors_catalog_cache(
    httpd: Any, catalog_dir: Path, work: Path
) -> None:
    """The marketplace monitor fetched images.json; the export right after asks with the
    validators the monitor stored (a 304), not for the whole catalog again."""
    from onemarket.action import Market
    from onemarket.backends.base import Context
    from onemarket.catalogs.linuxcontainers import LinuxContainersCatalog
    from onemarket.installation import Installation

    catalog = (catalog_dir / "streams/v1/images.json").read_bytes()
    versions = json.loads(catalog)["products"]["alpine:3.19:amd64:default"]["versions"]
    path = versions[max(versions)]["items"]["root.tar.xz"]["path"]
    httpd.routes["/streams/v1/images.json"] = catalog
    httpd.routes["/" + path] = (catalog_dir / path).read_bytes()
    env = env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none")
    market = Market(id=0, name="lxc", driver="linuxcontainers", attrs={"ENDPOINT": httpd.url})
    installation = Installation.detect(env)
    LinuxContainersCatalog(market, Context(installation)).monitor()
    source = f"lxd://{httpd.url}/{path}?size={SIZE_MB}&filesystem=ext4&format=raw"
    proc = run([], source, str(work / "img"), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    gets = [r for r in httpd.requests if r.path == "/streams/v1/images.json"]
    assert len(gets) == 2 and "If-None-Match" in gets[1].headers


def test_market_attributes_of_the_export(server: Any, work: Path) -> None:
    """oned's DRV_ACTION for an export carries the MARKETPLACE: its CONTEXT_PACKAGES wins over
    the defaultrc variable, and its ENDPOINT (with credentials) splits the SOURCE."""
    from tests import payloads

    (work / "market-ctx").mkdir()
    (work / "market-ctx" / "one-context_7.1.0-1.deb").write_bytes(fake_deb())
    attrs = {"ENDPOINT": server.base_url + "/", "CONTEXT_PACKAGES": str(work / "market-ctx")}
    doc = (
        "<DS_DRIVER_ACTION_DATA>"
        + payloads.image_xml(id=20, name="exported", source="", template={"FROM_APP": "3"})
        + payloads.datastore_xml()
        + payloads.market_xml("linuxcontainers", attrs, name="lxc market")
        + "</DS_DRIVER_ACTION_DATA>"
    )
    env = env_for(work, ONE_MARKET_CONTEXT_PACKAGES="none", DRV_ACTION=payloads.b64(doc))
    dest = work / "img"
    proc = run([], source_of(server, "ubuntu:jammy:amd64:default"), str(dest), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"one-context_7.1.0-1.deb from {work / 'market-ctx'} added" in proc.stderr.decode()
    assert "echo context" in debugfs(dest, "cat /usr/sbin/one-contextd")


def test_directory_destination_refused_before_download(server: Any, work: Path) -> None:
    proc = run([], source_of(server, "alpine:3.19:amd64:default"), str(work), env=env_for(work))
    assert proc.returncode == dl.EXIT_FAILURE
    assert f"destination {work} is a directory" in proc.stderr.decode()
    assert "downloading" not in proc.stderr.decode()
