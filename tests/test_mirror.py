"""``one-market mirror`` against loopback sources, the mirror served by nginx with the README rule.

Sources: an appmarket-simple-like server (tests/servers/appmarket.py, the real Community
Marketplace answer with small real files) and a Linux Containers tree with real bytes
(tests/tools/gen_images_json.py --real-bytes) served statically. The check is the issue's:
our drivers pointed at the mirror publish the same NAME, MD5, SIZE and VERSION as pointed at
the source, and every SOURCE inside the mirror downloads with the catalog's checksum.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from onemarket import cli, driverlog, web
from onemarket.action import Market
from onemarket.backends.base import Context, MonitorResult
from onemarket.backends.s3 import S3Backend
from onemarket.catalogs.linuxcontainers import LinuxContainersCatalog
from onemarket.catalogs.opennebula import OpenNebulaCatalog
from onemarket.errors import ChecksumError, StorageError
from onemarket.installation import Installation
from onemarket.mirror import fetch
from onemarket.mirror.command import add_mirror_parser
from onemarket.mirror.model import MirrorEntry, MirrorFile
from onemarket.mirror.report import (
    FILE_LABEL_CHARS,
    STATUS_MIRRORED,
    STATUS_UNCHANGED,
    Reporter,
)
from onemarket.mirror.s3target import S3Target
from onemarket.mirror.store import LocalStore
from onemarket.template import Template, parse_template
from rich.console import Console

from tests.backends.test_s3 import raw_client
from tests.catalogs.test_linuxcontainers import generate
from tests.servers import need_program, small_tmpfs
from tests.servers.appmarket import Appmarket, running_appmarket
from tests.servers.httpd import StaticHttpServer, truncated
from tests.servers.mirror_web import MirrorWeb, running_mirror_web
from tests.servers.rgw import CephRgw

REPO = Path(__file__).resolve().parents[1]
LXC_ONLY = (
    r"^(ubuntu:jammy:amd64:(default|cloud)|alpine:3\.19:(amd64|arm64):(default|cloud)"
    r"|debian:bookworm:amd64:default)$"
)
GENERATOR_ARGS = ("--profile", "2024", "--seed", "8", "--versions", "2", "--real-bytes")
GENERATOR_ARGS += ("--only", LXC_ONLY)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wait between download attempts."""
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(web, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def appmarket() -> Iterator[Appmarket]:
    with running_appmarket() as market:
        yield market


@pytest.fixture
def mirror_web(tmp_path: Path) -> Iterator[MirrorWeb]:
    with running_mirror_web(tmp_path) as server:
        yield server


@dataclass
class Mirroring:
    """``one-market mirror SOURCE DEST`` of one installation, run as often as a test needs."""

    installation: Installation
    source: Path
    dest: Path

    def json(self, *argv: str) -> tuple[int, dict]:
        return mirror_json(self.installation, str(self.source), str(self.dest), *argv)

    def run(self, *argv: str) -> tuple[int, str, str]:
        return mirror(self.installation, str(self.source), str(self.dest), *argv)


@pytest.fixture
def community(appmarket: Appmarket, installation: Installation, tmp_path: Path) -> Mirroring:
    """The appmarket's catalog through a ``one`` template, mirrored into ``tmp_path/tree``."""
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    return Mirroring(installation, source, tmp_path / "tree")


@pytest.fixture
def installation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Installation:
    base = tmp_path / "one"
    inst = Installation(base, base / "var" / "remotes", base / "var", base / "lib" / "mads")
    inst.remotes.mkdir(parents=True)
    (inst.remotes / "VERSION").write_text("7.0.0\n")
    (inst.var_dir / "cache" / "market").mkdir(parents=True)
    monkeypatch.setenv("ONE_LOCATION", str(base))
    return inst


def template_file(folder: Path, name: str, driver: str, endpoint: str, **attrs: str) -> Path:
    path = folder / f"{name}.tmpl"
    lines = [f'NAME = "{name}"', f'MARKET_MAD = "{driver}"', f'ENDPOINT = "{endpoint}"']
    lines += [f'{k} = "{v}"' for k, v in attrs.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def mirror(installation: Installation, *argv: str) -> tuple[int, str, str]:
    """Run ``one-market mirror ARGV`` in this process: (exit status, stdout, stderr)."""
    common = cli.Parser(add_help=False)
    common.add_argument("--json", action="store_true")
    common.add_argument("--debug", action="store_true")
    parser = cli.Parser(prog="one-market")
    add_mirror_parser(parser.add_subparsers(dest="command"), common, lambda: installation)
    out, err = io.StringIO(), io.StringIO()
    saved = driverlog.stream
    driverlog.stream = err
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(["mirror", *argv])
            try:
                code = args.func(args)
            except cli.MarketError as exc:
                err.write(f"one-market: {exc}\n")
                code = 1
    finally:
        driverlog.stream = saved
    return code, out.getvalue(), err.getvalue()


def mirror_json(installation: Installation, *argv: str) -> tuple[int, dict]:
    code, out, err = mirror(installation, *argv, "--json")
    assert out, err
    return code, json.loads(out)


def apps_of(result: MonitorResult) -> list[Template]:
    top = parse_template(result.to_template())
    return [parse_template(base64.b64decode(v)) for v in top.get_all("APP")]


def one_apps(installation: Installation, endpoint: str, **attrs: str) -> list[Template]:
    market = Market(0, "m", "one", {"ENDPOINT": endpoint, **attrs})
    return apps_of(OpenNebulaCatalog(market, Context(installation)).monitor())


def lxc_apps(installation: Installation, endpoint: str, **attrs: str) -> list[Template]:
    market = Market(0, "m", "linuxcontainers", {"ENDPOINT": endpoint, **attrs})
    return apps_of(LinuxContainersCatalog(market, Context(installation)).monitor())


def published(apps: list[Template]) -> dict[str, tuple]:
    fields = ("MD5", "SIZE", "VERSION", "TYPE", "FORMAT", "ARCHITECTURE", "HYPERVISOR")
    return {a.get("NAME"): tuple(a.get(f) for f in fields) for a in apps}


def curl(url: str, out: Path) -> bytes:
    """Download as the stock downloader.sh does for http SOURCEs (curl --fail -L)."""
    need_program("curl", "curl")
    subprocess.run(["curl", "--fail", "-sS", "-k", "-L", "-o", str(out), url], check=True)
    return out.read_bytes()


def tree_files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}


def leftovers(tree: Path) -> list[str]:
    return sorted(p for p in tree_files(tree) if p.endswith((".part", ".ready", ".new")))


def assert_valid_one_mirror(tree: Path) -> set[str]:
    """Every file appliance.json lists is in place with its md5; returns the names listed."""
    doc = json.loads((tree / "appliance.json").read_bytes())
    for app in doc["appliances"]:
        for n, f in enumerate(app.get("files") or []):
            body = (tree / "appliance" / app["_id"]["$oid"] / "download" / str(n)).read_bytes()
            assert hashlib.md5(body).hexdigest() == f["md5"], app["name"]
    return {a["name"] for a in doc["appliances"]}


# --------------------------------------------------------------------------- one catalogs


def test_one_mirror_publishes_as_the_source(
    appmarket: Appmarket, mirror_web: MirrorWeb, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    code, summary = mirror_json(installation, str(source), str(mirror_web.tree), "--jobs", "3")
    assert code == 0, summary
    assert len(summary["mirrored"]) == len(appmarket.appliances)
    assert summary["bytes"] == sum(len(b) for b in appmarket.blobs.values())

    at_source = one_apps(installation, appmarket.url + "/")
    at_mirror = one_apps(installation, mirror_web.url)
    assert published(at_mirror) == published(at_source)
    assert len(at_mirror) == len(appmarket.appliances)
    for app in at_mirror:
        assert app.get("SOURCE").startswith(mirror_web.url + "appliance/")
        if app.get("TYPE") == "IMAGE":
            body = curl(app.get("SOURCE"), tmp_path / "download")
            assert hashlib.md5(body).hexdigest() == app.get("MD5")
    doc = json.loads((mirror_web.tree / "appliance.json").read_bytes())
    assert appmarket.url not in json.dumps(doc)  # relocatable: links are relative
    assert leftovers(mirror_web.tree) == []


def test_one_second_run_downloads_nothing_and_a_changed_appliance_is_fetched(
    appmarket: Appmarket, community: Mirroring
) -> None:
    dest = community.dest
    assert community.json()[0] == 0
    first = appmarket.file_requests()

    code, summary = community.json()
    assert code == 0
    assert appmarket.file_requests() == first
    assert summary["downloads"] == 0 and summary["bytes"] == 0
    assert summary["catalog_unchanged"] is True  # conditional GET answered 304
    assert len(summary["unchanged"]) == len(appmarket.appliances)

    nixos = appmarket.by_name("NixOS")
    appmarket.set_file(nixos, 0, os.urandom(5000))
    nixos["version"] = "26.05"
    appmarket.publish()
    code, summary = community.json()
    assert code == 0
    assert summary["mirrored"] == ["NixOS"]
    assert summary["downloads"] == 1 and summary["bytes"] == 5000
    served = dest / "appliance" / nixos["_id"]["$oid"] / "download" / "0"
    assert hashlib.md5(served.read_bytes()).hexdigest() == nixos["files"][0]["md5"]


def test_selection_templates_bring_their_images_and_names_follow_the_suffix(
    appmarket: Appmarket, mirror_web: MirrorWeb, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    code, _out, err = mirror(
        installation,
        str(source),
        str(mirror_web.tree),
        "--include",
        "lithops service",
        "--exclude",
        "RabbitMQ",
        "--name-suffix",
        " (air)",
    )
    assert code == 0, err
    assert "refers to 'Lithops', which this catalog does not publish" in err
    apps = {a.get("NAME"): a for a in one_apps(installation, mirror_web.url)}
    # the service brings its roles' VM templates and images, even one --exclude names
    assert set(apps) == {
        f"{n} (air)"
        for n in (
            "Lithops Service",
            "Lithops - Virtual Router",
            "Lithops - MinIO",
            "Lithops - Client",
            "Lithops - Worker",
            "RabbitMQ",
        )
    }
    roles = {r["NAME"]: r["APP"] for r in apps["Lithops Service (air)"].get_all("ROLE")}
    assert roles["rabbitmq"] == "RabbitMQ (air)"
    assert roles["vr"] == "Lithops - Virtual Router (air)"
    disks = [d["APP"] for d in apps["Lithops - Virtual Router (air)"].get_all("DISK")]
    assert disks == ["Service Virtual Router"]  # not in this catalog: left as it was


def test_driver_filters_of_the_source_template_apply(
    appmarket: Appmarket, installation: Installation, tmp_path: Path
) -> None:
    appmarket.by_name("NemoClaw")["os-arch"] = "aarch64"
    appmarket.by_name("UERANSIM")["hypervisor"] = "LXC"
    appmarket.publish()
    attrs = {"ARCHITECTURES": "x86_64", "HYPERVISORS": "kvm"}
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/", **attrs)
    dest = tmp_path / "tree"
    code, summary = mirror_json(installation, str(source), str(dest))
    assert code == 0
    expected = {a.get("NAME") for a in one_apps(installation, appmarket.url + "/", **attrs)}
    assert set(summary["mirrored"]) == expected
    assert "NemoClaw" not in expected and "UERANSIM" not in expected


def test_dry_run_lists_sizes_and_writes_nothing(appmarket: Appmarket, community: Mirroring) -> None:
    dest = community.dest
    code, out = community.json("--dry-run")
    assert code == 0
    assert out["fetch_bytes"] == sum(len(b) for b in appmarket.blobs.values())
    assert {e["status"] for e in out["entries"]} == {"fetch"}
    assert not dest.exists()
    assert appmarket.file_requests() == 0
    code, text, _err = community.run("--dry-run")
    assert code == 0 and "apps," in text.splitlines()[-1]


def test_prune_removes_what_no_entry_names(appmarket: Appmarket, community: Mirroring) -> None:
    dest = community.dest
    assert community.json()[0] == 0
    gone = appmarket.by_name("Phoenix RTOS")
    appmarket.appliances.remove(gone)
    appmarket.publish()
    folder = dest / "appliance" / gone["_id"]["$oid"]
    assert community.json()[0] == 0
    assert folder.is_dir()  # without --prune old files stay
    code, summary = community.json("--prune")
    assert code == 0 and summary["pruned"] == 1
    assert not folder.exists()
    doc = json.loads((dest / "appliance.json").read_bytes())
    assert "Phoenix RTOS" not in {a["name"] for a in doc["appliances"]}


# --------------------------------------------------------------------------- faults


def test_truncated_download_is_retried_then_left_out(
    appmarket: Appmarket, community: Mirroring
) -> None:
    dest = community.dest
    nixos = appmarket.by_name("NixOS")
    cdn = nixos["files"][0]["url"].removeprefix(appmarket.url)
    appmarket.server.routes[cdn] = truncated(appmarket.blobs[cdn], 1000)
    code, summary = community.json()
    assert code == 1
    assert [f["name"] for f in summary["failed"]] == ["NixOS"]
    assert appmarket.server.count(cdn) == fetch.FILE_ATTEMPTS
    assert len(summary["mirrored"]) == len(appmarket.appliances) - 1
    doc = json.loads((dest / "appliance.json").read_bytes())
    assert "NixOS" not in {a["name"] for a in doc["appliances"]}
    assert leftovers(dest) == []


def test_wrong_checksum_keeps_the_previous_copy(appmarket: Appmarket, community: Mirroring) -> None:
    dest = community.dest
    assert community.json()[0] == 0
    before = (dest / "appliance.json").read_bytes()
    nixos = appmarket.by_name("NixOS")
    path = dest / "appliance" / nixos["_id"]["$oid"] / "download" / "0"
    old = path.read_bytes()
    appmarket.set_file(nixos, 0, os.urandom(4000))
    nixos["files"][0]["md5"] = nixos["files"][0]["checksum"]["md5"] = "0" * 32
    nixos["version"] = "26.05"
    appmarket.publish()
    code, summary = community.json()
    assert code == 1
    assert summary["failed"][0]["name"] == "NixOS"
    assert "MD5 mismatch" in summary["failed"][0]["error"]
    assert summary["failed"][0]["previous_kept"] is True
    assert path.read_bytes() == old
    assert (dest / "appliance.json").read_bytes() == before
    assert leftovers(dest) == []


def test_source_down_mid_run_leaves_the_mirror_valid_and_the_next_run_resumes(
    appmarket: Appmarket, community: Mirroring
) -> None:
    dest = community.dest
    assert community.json()[0] == 0
    before = (dest / "appliance.json").read_bytes()
    images = [a for a in appmarket.appliances if a.get("files")]
    for app in images:  # a new release of every image
        appmarket.set_file(app, 0, os.urandom(3000))
        app["version"] += "-new"
    appmarket.publish()
    served = {"n": 0}
    routes = appmarket.server.routes

    def down_after_three(path: str, body: bytes):
        def handler(h) -> None:
            served["n"] += 1
            if served["n"] > 3:  # the source goes away: connections are dropped unanswered
                h.close_connection = True
                return
            appmarket.server.serve_bytes(h, body)

        return handler

    for path in [p for p in routes if p.startswith("/cdn/")]:
        routes[path] = down_after_three(path, appmarket.blobs[path])
    code, summary = community.json("--jobs", "1")
    assert code == 1
    assert len(summary["failed"]) == len(images) - 3
    assert all(f["previous_kept"] for f in summary["failed"])
    not_tried = [f for f in summary["failed"] if f["error"].startswith("not tried")]
    assert len(not_tried) == len(images) - 3 - fetch.MAX_FAILURES_IN_ROW
    assert_valid_one_mirror(dest)
    doc = json.loads((dest / "appliance.json").read_bytes())
    old = {a["name"]: a for a in json.loads(before)["appliances"]}
    for app in doc["appliances"]:
        if app["name"] in {f["name"] for f in summary["failed"]}:
            assert app == old[app["name"]]

    appmarket.publish()  # the source is back
    requests_before = appmarket.file_requests()
    code, summary = community.json()
    assert code == 0
    assert appmarket.file_requests() - requests_before == len(images) - 3
    assert leftovers(dest) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_signal_mid_run_leaves_the_previous_mirror_and_keeps_verified_files(
    appmarket: Appmarket, community: Mirroring, installation: Installation, signum: int
) -> None:
    dest = community.dest
    assert community.json("--include", "NixOS")[0] == 0
    before = (dest / "appliance.json").read_bytes()
    stuck = appmarket.by_name("UERANSIM")
    cdn = stuck["files"][0]["url"].removeprefix(appmarket.url)
    body = appmarket.blobs[cdn]
    release = threading.Event()

    def hang(h) -> None:  # half the file, then nothing until the test ends
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.wfile.flush()
        release.wait(60)

    appmarket.server.routes[cdn] = hang
    env = {**os.environ, "ONE_LOCATION": str(installation.one_location)}
    argv = ["mirror", str(community.source), str(dest), "--jobs", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "onemarket.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        for _ in range(600):  # bounded: until the hanging file is being written (or exit)
            if any(p.endswith(".part") for p in tree_files(dest)) and (
                appmarket.file_requests() >= len(appmarket.blobs)
            ):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=60)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    if signum == signal.SIGKILL:  # no clean-up possible: the next run removes the .part
        assert proc.returncode == -signal.SIGKILL
    else:  # unwound: 128 + signal, as a shell reports it, and nothing half-written left
        assert proc.returncode == 128 + signum, err
        assert not [p for p in tree_files(dest) if p.endswith(".part")]
    assert (dest / "appliance.json").read_bytes() == before
    staged = [p for p in tree_files(dest) if p.endswith(".ready")]
    assert staged  # verified downloads wait for the next run

    appmarket.publish()
    requests_before = appmarket.file_requests()
    code, summary = community.json()
    assert code == 0, summary
    # only what was not verified yet is fetched again: the interrupted file, at most
    assert appmarket.file_requests() - requests_before == len(appmarket.blobs) - 1 - len(staged)
    assert leftovers(dest) == []


def test_a_failed_rename_while_publishing_leaves_no_new_file(tmp_path: Path) -> None:
    """The catalogs are written as hidden '.new' files, then renamed: one rename failing (a
    folder in the way) removes those not renamed yet."""
    store = LocalStore(tmp_path)
    (tmp_path / "appliance.json" / "in-the-way").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"cannot publish .*appliance\.json"):
        store.publish([], {"streams.json": b"{}", "appliance.json": b"{}"})
    assert (tmp_path / "streams.json").read_bytes() == b"{}"  # renamed before the failure
    assert [p for p in tree_files(tmp_path) if p.endswith(".new")] == []


def test_disk_full_fails_the_run_and_leaves_the_previous_mirror(
    appmarket: Appmarket,
    installation: Installation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dest = tmp_path / "small"
    room = 400 * 1024
    with small_tmpfs(dest, room) as mounted:
        if not mounted:  # no mount here: the same ENOSPC from the writes, once the room is used
            from onemarket.transfer import streamcopy

            real = streamcopy._pwrite_all
            used = {"n": 0}

            def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
                used["n"] += len(view)
                if used["n"] > room:
                    raise OSError(28, "No space left on device")
                real(fd, view, offset)

            monkeypatch.setattr(streamcopy, "_pwrite_all", pwrite_all)
        source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
        code, summary = mirror_json(installation, str(source), str(dest), "--include", "NixOS")
        assert code == 0, summary
        before = (dest / "appliance.json").read_bytes()
        code, _out, err = mirror(installation, str(source), str(dest), "--jobs", "1")
        assert code == 1
        assert "storage full" in err
        # what fitted may be published, the rest is not; the mirror stays valid either way
        listed = assert_valid_one_mirror(dest)
        assert "NixOS" in listed
        assert len(listed) < len(appmarket.appliances)
        assert (dest / "appliance.json").read_bytes() == before or "FAILED" in err
        assert not [p for p in tree_files(dest) if p.endswith((".part", ".new"))]


# --------------------------------------------------------------------------- simplestreams


@pytest.fixture(scope="module")
def lxc_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_program("qemu-img", "qemu-utils")
    return generate(tmp_path_factory.mktemp("lxc-source"), *GENERATOR_ARGS)


@pytest.fixture
def lxc_source(lxc_tree: Path) -> Iterator[StaticHttpServer]:
    server = StaticHttpServer()
    server.add_tree(lxc_tree)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_simplestreams_mirror_publishes_as_the_source(
    lxc_source: StaticHttpServer,
    lxc_tree: Path,
    mirror_web: MirrorWeb,
    installation: Installation,
    tmp_path: Path,
) -> None:
    attrs = {"VM_IMAGES": "yes", "ARCHITECTURES": "x86_64 aarch64"}
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/", **attrs)
    code, summary = mirror_json(installation, str(source), str(mirror_web.tree))
    assert code == 0, summary
    at_source = lxc_apps(installation, lxc_source.url + "/", **attrs)
    at_mirror = lxc_apps(installation, mirror_web.url, **attrs)
    assert published(at_mirror) == published(at_source)
    assert {a.get("HYPERVISOR") for a in at_mirror} == {"lxc", "kvm"}

    catalog = json.loads((lxc_tree / "streams/v1/images.json").read_bytes())
    sha = {
        item["path"]: item["sha256"]
        for product in catalog["products"].values()
        for version in product["versions"].values()
        for item in version["items"].values()
    }
    with requests.Session() as session:
        for app in at_mirror:
            url = app.get("SOURCE").removeprefix("lxd://").split("?", 1)[0]
            assert url.startswith(mirror_web.url)
            body = session.get(url, timeout=30).content
            assert hashlib.sha256(body).hexdigest() == sha[url.removeprefix(mirror_web.url)]
    mirrored = json.loads((mirror_web.tree / "streams/v1/images.json").read_bytes())
    index = json.loads((mirror_web.tree / "streams/v1/index.json").read_bytes())
    assert index["index"]["images"]["products"] == sorted(mirrored["products"])
    for product in mirrored["products"].values():
        assert len(product["versions"]) == 1  # the newest build, the one the driver publishes
        (version,) = product["versions"].values()
        ftypes = {i["ftype"] for i in version["items"].values()}
        assert "incus.tar.xz" in ftypes  # the metadata tarball LXD and Incus need
        assert "squashfs" not in ftypes
        for item in version["items"].values():
            assert (
                hashlib.sha256((mirror_web.tree / item["path"]).read_bytes()).hexdigest()
                == (item["sha256"])
            )
    assert lxc_source.url not in json.dumps(mirrored)

    before = len(lxc_source.requests)
    code, summary = mirror_json(installation, str(source), str(mirror_web.tree))
    assert code == 0 and summary["downloads"] == 0
    paths = [r.path for r in lxc_source.requests[before:]]
    assert paths == ["/streams/v1/images.json"]  # and it answered 304


def test_simplestreams_endpoint_with_credentials_mirrors_the_same_apps(
    lxc_source: StaticHttpServer, installation: Installation, tmp_path: Path
) -> None:
    # apps' LINKs carry no password: the plan matched them against ENDPOINT with it and found none
    plain = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/")
    with_pw = lxc_source.url.replace("http://", "http://user:s3cret@") + "/"
    (tmp_path / "pw").mkdir()
    secret = template_file(tmp_path / "pw", "LXC", "linuxcontainers", with_pw)
    code, plain_summary = mirror_json(installation, str(plain), str(tmp_path / "a"))
    assert code == 0, plain_summary
    code, summary = mirror_json(installation, str(secret), str(tmp_path / "b"))
    assert code == 0, summary
    assert summary["mirrored"] and summary["mirrored"] == plain_summary["mirrored"]
    assert "s3cret" not in json.dumps(summary)
    for path in (tmp_path / "b").rglob("*.json"):
        assert b"s3cret" not in path.read_bytes()


def test_simplestreams_name_suffix_goes_after_the_release(
    lxc_source: StaticHttpServer, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/")
    dest = tmp_path / "tree"
    code, summary = mirror_json(
        installation, str(source), str(dest), "--name-suffix=-air", "--include", "ubuntu*"
    )
    assert code == 0, summary
    at_source = [a.get("NAME") for a in lxc_apps(installation, lxc_source.url + "/")]
    expected = [n.replace("jammy", "jammy-air", 1) for n in at_source if n.startswith("ubuntu")]
    assert len(expected) == 1
    assert summary["mirrored"] == expected
    web = StaticHttpServer()
    web.add_tree(dest)
    web.start()
    try:
        names = [a.get("NAME") for a in lxc_apps(installation, web.url + "/")]
    finally:
        web.stop()
    assert names == expected


def test_cli_runs_mirror(appmarket: Appmarket, installation: Installation, tmp_path: Path) -> None:
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    code = cli.main(["mirror", str(source), str(tmp_path / "tree"), "--include", "NixOS"])
    assert code == 0
    assert (tmp_path / "tree" / "appliance.json").is_file()


def test_to_market_puts_the_tree_under_public_dir(
    lxc_source: StaticHttpServer, nginx, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/")
    target = tmp_path / "http.tmpl"
    target.write_text(
        f'NAME = "Private"\nMARKET_MAD = "http"\nBASE_URL = "{nginx.base_url}"\n'
        f'PUBLIC_DIR = "{nginx.public_dir}"\n'
    )
    code, out, err = mirror(installation, str(source), "--to-market", str(target))
    assert code == 0, err
    endpoint = f"{nginx.base_url}/mirror/"
    assert f'ENDPOINT = "{endpoint}"' in out  # the marketplace to create, printed
    assert (nginx.public_dir / "mirror" / "streams" / "v1" / "index.json").is_file()
    at_source = lxc_apps(installation, lxc_source.url + "/")
    assert published(lxc_apps(installation, endpoint)) == published(at_source)

    other = tmp_path / "other.tmpl"
    other.write_text('NAME = "Other"\nMARKET_MAD = "dockerhub"\n')
    code, _out, err = mirror(installation, str(source), "--to-market", str(other))
    assert code == 1 and "only http and s3 marketplaces" in err


def public_bucket(rgw: CephRgw, prefix: str) -> str:
    """A new bucket whose ``prefix/`` anyone may read (how a stock driver reads it: no keys)."""
    bucket = f"mirror-{uuid.uuid4().hex[:12]}"
    client = raw_client(rgw)
    client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(read_policy(bucket, prefix)))
    return bucket


def read_policy(bucket: str, prefix: str) -> dict:
    """README's bucket policy: anonymous GetObject below the mirror's prefix."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}/*"],
            }
        ],
    }


def s3_attrs(rgw: CephRgw, bucket: str) -> dict[str, str]:
    return {
        "BUCKET": bucket,
        "ENDPOINT": rgw.endpoint,
        "ACCESS_KEY_ID": rgw.access_key,
        "SECRET_ACCESS_KEY": rgw.secret_key,
        "REGION": "us-east-1",
        "AWS": "no",
    }


def s3_template(folder: Path, rgw: CephRgw, bucket: str) -> Path:
    """An s3 marketplace template for ``--to-market`` (NAME "Bucket")."""
    path = folder / "s3.tmpl"
    attrs = {"NAME": "Bucket", "MARKET_MAD": "s3", **s3_attrs(rgw, bucket)}
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in attrs.items()))
    return path


def test_s3_put_file_replaces_an_object_and_checks_it(
    rgw: CephRgw, installation: Installation, tmp_path: Path
) -> None:
    """More than one part (multipart, ETag checked), then a small file over it; a wrong MD5
    fails and leaves the object as it was."""
    bucket = public_bucket(rgw, "big")
    target = S3Target(Market(0, "Bucket", "s3", s3_attrs(rgw, bucket)), installation, "big")
    path = tmp_path / "file"
    data = os.urandom(17 << 20)
    path.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    assert target.backend.put_file(target.key("f"), str(path), md5) == md5
    assert hashlib.md5(requests.get(target.url + "f", timeout=60).content).hexdigest() == md5
    path.write_bytes(b"small")
    target.backend.put_file(target.key("f"), str(path))
    assert requests.get(target.url + "f", timeout=30).content == b"small"
    path.write_bytes(b"other")
    with pytest.raises(ChecksumError):
        target.backend.put_file(target.key("f"), str(path), md5)
    assert requests.get(target.url + "f", timeout=30).content == b"small"


@dataclass
class BucketMirroring:
    """``one-market mirror SOURCE --to-market <s3 market> --sub-path PREFIX`` into a new bucket
    whose prefix anyone may read, run as often as a test needs."""

    installation: Installation
    source: Path
    rgw: CephRgw
    folder: Path
    prefix: str

    def __post_init__(self) -> None:
        self.bucket = public_bucket(self.rgw, self.prefix)
        self.template = s3_template(self.folder, self.rgw, self.bucket)

    def upload(self, *argv: str) -> dict:
        """The run's ``upload`` summary (the run must succeed)."""
        target = ("--to-market", str(self.template), "--sub-path", self.prefix)
        code, summary = mirror_json(self.installation, str(self.source), *target, *argv)
        assert code == 0, summary
        return summary["upload"]

    def stock_get(self, path: str) -> requests.Response:
        """What a stock monitor's ``GET <ENDPOINT>/<path>`` reads (ENDPOINT ending with '/':
        ``//`` on S3, where nginx would merge it)."""
        return requests.get(f"{self.rgw.endpoint}/{self.bucket}/{self.prefix}//{path}", timeout=30)


def test_to_s3_market_uploads_the_tree_under_a_prefix(
    appmarket: Appmarket, rgw: CephRgw, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    run = BucketMirroring(installation, source, rgw, tmp_path, "air")
    upload = run.upload()
    endpoint = f"{rgw.endpoint}/{run.bucket}/air/"
    assert upload["url"] == endpoint
    assert upload["files"] == len(appmarket.blobs) and upload["catalogs"] == 1
    at_mirror = one_apps(installation, endpoint)
    assert published(at_mirror) == published(one_apps(installation, appmarket.url + "/"))
    for app in at_mirror:
        assert app.get("SOURCE").startswith(endpoint + "appliance/")
        if app.get("TYPE") == "IMAGE":
            body = curl(app.get("SOURCE"), tmp_path / "download")
            assert hashlib.md5(body).hexdigest() == app.get("MD5")
    stock = run.stock_get("appliance")
    assert stock.status_code == 200 and len(stock.json()["appliances"]) == len(at_mirror)

    # again, nothing changed: nothing uploaded; a new release: its file and the catalog
    upload = run.upload()
    assert upload["files"] == upload["catalogs"] == 0
    nixos = appmarket.by_name("NixOS")
    appmarket.set_file(nixos, 0, os.urandom(6000))
    nixos["version"] = "26.05"
    gone = appmarket.by_name("Phoenix RTOS")
    appmarket.appliances.remove(gone)
    appmarket.publish()
    upload = run.upload("--prune")
    assert upload["files"] == 1 and upload["catalogs"] == 1
    assert upload["deleted"] == len(gone.get("files") or [])
    apps = {a.get("NAME"): a for a in one_apps(installation, endpoint)}
    assert "Phoenix RTOS" not in apps
    body = curl(apps["NixOS"].get("SOURCE"), tmp_path / "download")
    assert hashlib.md5(body).hexdigest() == apps["NixOS"].get("MD5") == nixos["files"][0]["md5"]


def test_to_s3_market_failed_midway_records_what_it_uploaded(
    appmarket: Appmarket,
    rgw: CephRgw,
    installation: Installation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second upload fails: the state names the first, which the next run does not send."""
    source = template_file(tmp_path, "Community", "one", appmarket.url + "/")
    run = BucketMirroring(installation, source, rgw, tmp_path, "half")
    real, calls = S3Backend.put_file, []

    def second_fails(self: S3Backend, key: str, path: str, md5: str = "") -> str:
        calls.append(key)
        if len(calls) == 2:
            raise StorageError("the link went down")
        return real(self, key, path, md5)

    monkeypatch.setattr(S3Backend, "put_file", second_fails)
    target = ("--to-market", str(run.template), "--sub-path", run.prefix)
    code, _, err = mirror(installation, str(source), *target)
    assert code == 1 and "the link went down" in err
    assert calls[-1].endswith("/.onemarket-mirror/uploaded.json")  # the state, after the failure
    monkeypatch.setattr(S3Backend, "put_file", real)
    upload = run.upload()
    assert upload["files"] == len(appmarket.blobs) - 1 and upload["unchanged"] == 1


def test_to_s3_market_serves_a_simplestreams_tree(
    lxc_source: StaticHttpServer, rgw: CephRgw, installation: Installation, tmp_path: Path
) -> None:
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/")
    run = BucketMirroring(installation, source, rgw, tmp_path, "lxc")
    endpoint = run.upload()["url"]
    at_source = lxc_apps(installation, lxc_source.url + "/")
    assert published(lxc_apps(installation, endpoint)) == published(at_source)
    stock = run.stock_get("streams/v1/images.json")
    assert stock.status_code == 200 and stock.json()["products"]


def test_a_product_whose_item_leaves_the_tree_is_skipped(
    lxc_source: StaticHttpServer, lxc_tree: Path, installation: Installation, tmp_path: Path
) -> None:
    catalog = json.loads(lxc_source.routes["/streams/v1/images.json"])
    product = catalog["products"]["debian:bookworm:amd64:default"]
    for version in product["versions"].values():
        version["items"]["incus.tar.xz"]["path"] = "../../outside/incus.tar.xz"
    lxc_source.routes["/streams/v1/images.json"] = json.dumps(catalog).encode()
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/")
    dest = tmp_path / "tree"
    code, _out, err = mirror(installation, str(source), str(dest))
    assert code == 0, err
    # named by its key in the catalog (amd64, not the driver's x86_64)
    assert "skipping product debian:bookworm:amd64:default:" in err
    assert "leaves the mirror folder" in err
    mirrored = json.loads((dest / "streams/v1/images.json").read_bytes())
    assert "debian:bookworm:amd64:default" not in mirrored["products"]
    assert mirrored["products"]
    assert not (tmp_path / "outside").exists()


def test_bad_options_are_one_line_errors(installation: Installation, tmp_path: Path) -> None:
    source = template_file(tmp_path, "Community", "one", "http://127.0.0.1:9/")
    code, _out, err = mirror(installation, str(source), str(tmp_path / "t"), "--name-suffix=a\nb")
    assert code == 1 and "--name-suffix" in err
    code, _out, err = mirror(installation, str(source), str(tmp_path / "t"), "--jobs", "0")
    assert code == 1 and "--jobs" in err
    http = template_file(tmp_path, "Private", "http", "")
    code, _out, err = mirror(installation, str(http), str(tmp_path / "t"))
    assert code == 1 and "only the public catalogs" in err


def test_project_downloader_exports_a_container_from_the_mirror(
    lxc_source: StaticHttpServer, mirror_web: MirrorWeb, installation: Installation, tmp_path: Path
) -> None:
    """The lxd:// SOURCE a mirror market publishes, exported by our downloader.sh replacement:
    the rootfs is found in the mirror's catalog, checked against its sha256, made a disk."""
    need_program("mke2fs", "e2fsprogs")
    attrs = {"IMAGE_SIZE_MB": "64"}
    source = template_file(tmp_path, "LXC", "linuxcontainers", lxc_source.url + "/", **attrs)
    code, summary = mirror_json(installation, str(source), str(mirror_web.tree))
    assert code == 0, summary
    app = next(
        a for a in lxc_apps(installation, mirror_web.url, **attrs) if "ubuntu" in a.get("NAME")
    )
    assert app.get("SOURCE").startswith(f"lxd://{mirror_web.url}images/")
    dest = tmp_path / "disk.raw"
    env = {k: v for k, v in os.environ.items() if k != "DRV_ACTION"}
    env.update(ONE_LOCATION=str(installation.one_location), ONE_MARKET_CONTEXT_PACKAGES="none")
    env["PYTHONPATH"] = str(REPO / "lib")
    before = len(lxc_source.requests)
    done = subprocess.run(
        [sys.executable, "-m", "onemarket.downloader", app.get("SOURCE"), str(dest)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert dest.stat().st_size == 64 << 20
    assert len(lxc_source.requests) == before  # everything came from the mirror


def test_a_second_run_rewrites_nothing(community: Mirroring) -> None:
    dest = community.dest
    assert community.json()[0] == 0
    before = {p: (dest / p).stat().st_mtime_ns for p in tree_files(dest)}
    assert community.json("--one-version", "7.0")[0] == 0
    assert {p: (dest / p).stat().st_mtime_ns for p in tree_files(dest)} == before


def test_proxies_come_from_the_environment(
    appmarket: Appmarket,
    installation: Installation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A catalog host only the proxy can resolve: catalog and files went through the proxy."""
    from tests.test_web import _Proxy

    with _Proxy(appmarket.server.port) as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        source = template_file(tmp_path, "Community", "one", "http://catalog.invalid/")
        code, summary = mirror_json(installation, str(source), str(tmp_path / "tree"))
    assert code == 0, summary
    assert "http://catalog.invalid/appliance" in proxy.seen
    downloads = [u for u in proxy.seen if u.startswith("http://catalog.invalid/appliance/")]
    assert len(downloads) == len(appmarket.blobs)


# --------------------------------------------------------------------------- progress output

_SGR_RE = re.compile(r"\x1b\[[0-9;]*m|\x1b\[\?25[hl]")
_REDRAW_RE = re.compile(r"\r?\x1b\[2K(?:\x1b\[1A\x1b\[2K)*")


def last_frame(written: str) -> str:
    """The bars as rich last drew them in ``written`` (terminal output, colours removed)."""
    frames = [f for f in _REDRAW_RE.split(_SGR_RE.sub("", written)) if f.strip()]
    return frames[-1] if frames else ""


class _Screen:
    """A fake terminal for a Reporter; ``since()`` is what was written since the last call."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.console = Console(file=self.buffer, force_terminal=True, width=100)
        self._seen = 0

    def since(self) -> str:
        text = self.buffer.getvalue()
        new, self._seen = text[self._seen :], len(text)
        return new


def _entries() -> tuple[MirrorEntry, ...]:
    one = MirrorFile("appliance/1/download/0", "http://127.0.0.1:9/1", 1000)
    two = MirrorFile("images/x/[red]disk.qcow2", "http://127.0.0.1:9/2", 3000)
    meta = MirrorFile("images/x/meta.tar.xz", "http://127.0.0.1:9/3", 10)
    return (
        MirrorEntry("0", ("Old",), "0.1", (), {}),
        MirrorEntry("1", ("App One",), "1.0", (one,), {}),
        MirrorEntry("2", ("App [b]Two " + "x" * 40,), "2.0", (two, meta), {}),
    )


def _drive(reporter: Reporter, screen: _Screen | None = None) -> list[str]:
    """What the command and the fetcher do to a Reporter; the frame drawn after each step."""
    old, first, second = _entries()
    (one,), (two, _meta) = first.files, second.files
    frames = []

    def step() -> None:
        reporter.draw()
        frames.append(last_frame(screen.since()) if screen else "")

    reporter.entry(STATUS_UNCHANGED, old)
    if screen:
        screen.since()  # the line, printed before the bars are shown
    reporter.file_started(first, one)
    reporter.file_started(second, two)
    reporter.file_bytes(one, 500)
    reporter.file_bytes(two, 1000)
    step()
    reporter.file_bytes(one, -500)  # a failed attempt, taken back
    reporter.file_bytes(one, 1000)
    reporter.file_ended(one)
    reporter.entry(STATUS_MIRRORED, first)
    step()
    reporter.file_bytes(two, 2000)
    reporter.file_ended(two)
    reporter.entry("FAILED (left out)", second, "wrong checksum")
    reporter.close()
    frames.append(last_frame(screen.since()) if screen else "")
    return frames


def test_terminal_shows_a_bar_per_file_and_one_overall() -> None:
    screen = _Screen()
    reporter = Reporter(io.StringIO(), False, 4000, 3, out=screen.console)
    reporter.interval_s = 0.0  # every draw() redraws
    both, one_left, final = _drive(reporter, screen)
    lines = both.splitlines()
    assert lines[0].startswith("mirror 1/3 apps") and "38%" in lines[0]
    assert "1.5/3.9 KiB" in lines[0]
    assert lines[1].startswith("App One ") and "50%" in lines[1]
    # an app with several files: its name cut, then the file's (shown, not taken as markup)
    assert lines[2].startswith("App [b]Two xxx") and "33%" in lines[2]
    assert lines[2][:FILE_LABEL_CHARS].endswith("... [red]disk.qcow2")
    assert one_left.splitlines()[0].startswith("mirror 2/3 apps")
    assert "App One" not in one_left and "App [b]Two" in one_left
    assert final.splitlines() == [final.splitlines()[0]]  # the file bars are gone
    assert final.startswith("mirror 3/3 apps") and "100%" in final
    text = _SGR_RE.sub("", screen.buffer.getvalue())
    for line in ("unchanged Old 0.1", "mirrored App One 1.0 (1000 B)"):
        assert f"{line}\n" in text
    assert "FAILED (left out) App [b]Two xxx" in text
    assert reporter.done_bytes == 4000


def test_terminal_redraws_are_throttled() -> None:
    screen = _Screen()
    reporter = Reporter(io.StringIO(), False, 10, 1, out=screen.console)
    reporter.interval_s = 3600.0
    reporter.draw()
    assert "mirror 0/1 apps" in screen.since()
    f = MirrorFile("a", "http://127.0.0.1:9/a", 10)
    reporter.file_started(MirrorEntry("a", ("A",), "1", (f,), {}), f)
    reporter.draw()
    assert screen.since() == ""
    reporter.close()


def test_not_a_terminal_one_line_per_app_and_quiet_nothing() -> None:
    stream = io.StringIO()
    assert _drive(Reporter(stream, False, 4000, 3))
    assert stream.getvalue() == (
        "unchanged Old 0.1\n"
        "mirrored App One 1.0 (1000 B)\n"
        f"FAILED (left out) App [b]Two {'x' * 40} 2.0: wrong checksum\n"
    )
    quiet = io.StringIO()
    _drive(Reporter(quiet, True, 4000, 3))
    assert quiet.getvalue() == ""


def test_mirror_on_a_terminal_draws_the_bars(
    community: Mirroring, appmarket: Appmarket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    code, _out, err = community.run("--jobs", "2")
    assert code == 0, err
    final = last_frame(err)
    total = len(appmarket.appliances)
    assert final.startswith(f"mirror {total}/{total} apps") and "100%" in final
    assert len(final.strip().splitlines()) == 1
    assert _SGR_RE.sub("", err).count("mirrored ") == total


def test_mirror_not_on_a_terminal_writes_one_line_per_app(
    community: Mirroring, appmarket: Appmarket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    code, _out, err = community.run("--jobs", "2")
    assert code == 0, err
    lines = [line for line in err.splitlines() if not line.startswith("WARN: ")]
    assert len(lines) == len(appmarket.appliances)
    assert all(re.fullmatch(r"mirrored .+ \(\d+(\.\d)? [KMG]?i?B\)", line) for line in lines)


def test_narrow_terminal_keeps_one_line_per_bar() -> None:
    screen = _Screen()
    screen.console.width = 80
    reporter = Reporter(io.StringIO(), False, 4000, 3, out=screen.console)
    reporter.interval_s = 0.0
    both = _drive(reporter, screen)[0]
    assert len(both.splitlines()) == 3, both
    assert all(len(line) <= 80 for line in both.splitlines())
    assert "... [red]di..." in both.splitlines()[2]  # both names cut, the file's kept
