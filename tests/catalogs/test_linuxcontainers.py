"""linuxcontainers monitor against generated simplestreams catalogs served on loopback.

Every expected app is computed here from the catalog JSON with code independent of the driver
(the stock rules of each release line, our documented extras and MD5 recipe), then compared
field by field; ``test_same_apps_as_the_stock_driver`` also compares with what the stock 7.5.80
and 6.10 monitors printed (tests/data/stock-lxc).
"""

from __future__ import annotations

import base64
import calendar
import copy
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from onemarket import driverlog, web
from onemarket.action import Market
from onemarket.backends.base import Context
from onemarket.catalogs import linuxcontainers as lxc
from onemarket.catalogs.linuxcontainers import CatalogStats, LinuxContainersCatalog, LxcOptions
from onemarket.catalogs.qcow2 import fetch_virtual_size
from onemarket.errors import ConfigError, RemoteError
from onemarket.installation import Installation, ReleaseLine
from onemarket.template import Template, parse_template

from tests.qemu_img import qemu_img_virtual_size
from tests.servers import free_port, need_program
from tests.servers.httpd import StaticHttpServer, failing_then, slow, truncated

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "tests" / "tools" / "gen_images_json.py"
CATALOG = "/streams/v1/images.json"
MIB = 1024 * 1024

ARCH = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "armhf": "armv7l",
    "i386": "i686",
    "ppc64el": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
TESTED = {
    "6.10": {
        "alpine",
        "alt",
        "rockylinux",
        "almalinux",
        "oracle",
        "debian",
        "ubuntu",
        "fedora",
        "devuan",
        "amazonlinux",
    },
    "7.x": {
        "almalinux",
        "alpine",
        "amazonlinux",
        "debian",
        "devuan",
        "fedora",
        "opensuse",
        "oracle",
        "rockylinux",
        "ubuntu",
    },
}
"""The stock monitors' tested lists (one-6.10 and one-7.0 monitor, ``:tested_apps``)."""
VERSION_FILE = {"6.10": "6.10.0.1\n", "7.x": "7.5.80\n"}
CONTEXT = {"NETWORK": "YES", "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]", "SET_HOSTNAME": "$NAME"}
GRAPHICS = {"LISTEN": "0.0.0.0", "TYPE": "vnc"}


# --------------------------------------------------------------------------------------------
# Catalogs and the monitor
# --------------------------------------------------------------------------------------------


def generate(out: Path, *args: str) -> Path:
    subprocess.run(
        [sys.executable, str(GENERATOR), "-o", str(out), *args],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    made: dict[tuple[str, ...], Path] = {}

    def get(*args: str) -> Path:
        if args not in made:
            made[args] = generate(tmp_path_factory.mktemp("lxc-catalog"), *args)
        return made[args]

    return get


def load(folder: Path) -> dict:
    return json.loads((folder / "streams" / "v1" / "images.json").read_bytes())


def dump(catalog: dict) -> bytes:
    return (json.dumps(catalog) + "\n").encode()


@dataclass
class Run:
    text: str
    apps: list[Template]
    warnings: list[str]
    stats: CatalogStats
    log: str = ""


def run_monitor(
    endpoint: str, attrs: dict[str, str], one_location: Path, release: str | None = None
) -> Run:
    """Monitor as an installation of ``release`` ("6.10", "7.x"; None: no remotes/VERSION)."""
    if release is not None:
        (one_location / "var" / "remotes").mkdir(parents=True, exist_ok=True)
        (one_location / "var" / "remotes" / "VERSION").write_text(VERSION_FILE[release])
    log = io.StringIO()
    saved = driverlog.stream
    driverlog.stream = log
    try:
        market = Market(7, "Linux Containers", "linuxcontainers", {"ENDPOINT": endpoint, **attrs})
        inst = Installation.detect({"ONE_LOCATION": str(one_location)})
        result, stats = LinuxContainersCatalog(market, Context(inst)).monitor_with_stats()
    finally:
        driverlog.stream = saved
    text = result.to_template()
    top = parse_template(text)
    assert [n for n in top.names() if n != "APP"] == ["USED_MB", "FREE_MB", "TOTAL_MB"]
    apps = [parse_template(base64.b64decode(v, validate=True)) for v in top.get_all("APP")]
    warnings = [line for line in log.getvalue().splitlines() if line.startswith("WARN: ")]
    return Run(text, apps, warnings, stats, log.getvalue())


def qcow2_header(virtual_size: int) -> bytes:
    return (
        b"QFI\xfb"
        + (3).to_bytes(4, "big")
        + bytes(12)
        + (16).to_bytes(4, "big")
        + virtual_size.to_bytes(8, "big")
    ).ljust(104, b"\0")


def synthetic_virtual_size(item: dict) -> int:
    """What the test server's fake qcow2 headers announce for a disk item."""
    return item["size"] * 3 + 12345


def serve_catalog(httpd: StaticHttpServer, catalog: dict) -> None:
    """The catalog, plus a qcow2 header for every disk item (fake catalogs have no files)."""
    httpd.routes[CATALOG] = dump(catalog)
    for product in catalog["products"].values():
        for version in product["versions"].values():
            for item in version["items"].values():
                if item["ftype"] == "disk-kvm.img":
                    httpd.routes["/" + item["path"]] = qcow2_header(synthetic_virtual_size(item))


# --------------------------------------------------------------------------------------------
# The independent expectation
# --------------------------------------------------------------------------------------------


def words(value: str | None, default: list[str]) -> list[str]:
    if value is None:
        return default
    return [w for w in value.replace(",", " ").split() if w] or default


def public(url: str) -> str:
    """``url`` without ``user:password@`` (what PUBLISHER and LINK may show)."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"


def expected_apps(
    catalog: dict,
    endpoint: str,
    attrs: dict[str, str],
    virtual_size: Callable[[dict], int] = synthetic_virtual_size,
    release: str = "7.x",
) -> dict[str, dict]:
    """NAME -> expected app (scalars plus the decoded APPTEMPLATE64/VMTEMPLATE64 items), by the
    stock rules of ``release`` ("6.10" or "7.x") plus our documented extras."""
    yes = {"yes", "true", "1", "on"}
    seven = release == "7.x"
    variants = words(attrs.get("VARIANTS"), ["default"])
    arches = words(attrs.get("ARCHITECTURES"), ["x86_64", "aarch64"] if seven else ["x86_64"])
    distros = words(attrs.get("DISTRIBUTIONS"), [])
    skip_untested = attrs.get("SKIP_UNTESTED", "yes") == "yes"
    size = attrs.get("IMAGE_SIZE_MB", "2048")
    fs = attrs.get("FILESYSTEM", "ext4")
    fmt = attrs.get("FORMAT", "raw")
    vm = attrs.get("VM_IMAGES", "no").lower() in yes
    vm_variants = words(attrs.get("VM_VARIANTS"), ["cloud"])
    cpu, vcpu, memory = attrs.get("CPU", "1"), attrs.get("VCPU", "2"), attrs.get("MEMORY", "768")
    unprivileged = "false" if attrs.get("PRIVILEGED", "true").lower() in yes else "true"
    shown = public(endpoint)
    out: dict[str, dict] = {}
    for key, product in catalog["products"].items():
        distro, release_name, ss_arch, variant = key.split(":")
        arch = ARCH.get(ss_arch, ss_arch)
        if arch not in arches:
            continue
        if distros and distro not in distros:
            continue
        if not distros and skip_untested and distro not in TESTED[release]:
            continue
        serial = max(product["versions"])  # YYYYMMDD_HH:MM sorts by date
        regtime = calendar.timegm(time.strptime(serial, "%Y%m%d_%H:%M"))
        items = product["versions"][serial]["items"]
        base = f"{distro}_{release_name}" + ("" if variant == "default" else f"_{variant}")
        suffix = "" if arch == "x86_64" else f" ({arch})"
        if variant in variants and "root.tar.xz" in items:
            item = items["root.tar.xz"]
            md5 = hashlib.md5(f"lxc-rootfs\n{item['sha256']}\n{size}\n{fs}\n{fmt}".encode())
            name = f"{base}{suffix}" if seven else f"{base} - LXC{suffix}"
            if seven:
                sched = f"HYPERVISOR=lxc & ARCH={arch}"
            else:
                sched = 'HYPERVISOR="lx*"' + ("" if arch == "x86_64" else f' & ARCH="{arch}"')
            vmtemplate = [
                ("SCHED_REQUIREMENTS", sched),
                ("CPU", cpu),
                ("VCPU", vcpu),
                ("MEMORY", memory),
                ("LXC_UNPRIVILEGED", unprivileged),
                ("GRAPHICS", GRAPHICS),
                ("CONTEXT", CONTEXT),
            ]
            if seven:
                vmtemplate += [
                    ("RAW", {"TYPE": "lxc", "DATA": "lxc.apparmor.profile=unconfined"}),
                    ("HYPERVISOR", "lxc"),
                ]
            out[name] = {
                "NAME": name,
                "SOURCE": f"lxd://{endpoint}{item['path']}?size={size}&filesystem={fs}"
                f"&format={fmt}",
                "IMPORT_ID": "-1",
                "ORIGIN_ID": "-1",
                "TYPE": "IMAGE",
                "PUBLISHER": shown,
                "FORMAT": fmt,
                "VERSION": serial,
                "REGTIME": str(regtime),
                "LINK": shown + item["path"],
                "SIZE": size,
                "MD5": md5.hexdigest(),
                "ARCHITECTURE": arch,
                "HYPERVISOR": "lxc",
                "APPTEMPLATE64": [("DRIVER", "raw")],
                "VMTEMPLATE64": vmtemplate,
            }
        if vm and variant in vm_variants and "disk.qcow2" in items:
            item = items["disk.qcow2"]
            req = product.get("requirements", product.get("lxd_requirements", {}))
            if arch == "aarch64":
                os_section = {
                    "ARCH": "aarch64",
                    "FIRMWARE": "/usr/share/AAVMF/AAVMF_CODE.fd",
                    "FIRMWARE_SECURE": "no",
                    "MACHINE": "virt",
                }
            else:
                secure = req.get("secureboot") != "false"
                os_section = {
                    "ARCH": "x86_64",
                    "FIRMWARE": "/usr/share/OVMF/OVMF_CODE" + (".secboot.fd" if secure else ".fd"),
                    "FIRMWARE_SECURE": "yes" if secure else "no",
                    "MACHINE": "q35",
                }
            out[f"{base} - KVM{suffix}"] = {
                "NAME": f"{base} - KVM{suffix}",
                "SOURCE": endpoint + item["path"],
                "IMPORT_ID": "-1",
                "ORIGIN_ID": "-1",
                "TYPE": "IMAGE",
                "PUBLISHER": shown,
                "FORMAT": "qcow2",
                "VERSION": serial,
                "REGTIME": str(regtime),
                "LINK": shown + item["path"],
                "SIZE": str(math.ceil(virtual_size(item) / MIB)),
                "MD5": hashlib.md5(f"kvm-qcow2\n{item['sha256']}".encode()).hexdigest(),
                "ARCHITECTURE": arch,
                "HYPERVISOR": "kvm",
                "APPTEMPLATE64": [("DEV_PREFIX", "vd"), ("DRIVER", "qcow2")],
                "VMTEMPLATE64": [
                    ("SCHED_REQUIREMENTS", f'HYPERVISOR="kvm" & ARCH="{arch}"'),
                    ("CPU", cpu),
                    ("VCPU", vcpu),
                    ("MEMORY", memory),
                    ("OS", os_section),
                    ("NIC_DEFAULT", {"MODEL": "virtio"}),
                    ("GRAPHICS", GRAPHICS),
                    ("CONTEXT", CONTEXT),
                    *([("HYPERVISOR", "kvm")] if seven else []),
                ],
            }
    return out


def as_expected(app: Template) -> dict:
    """An app as the comparable shape of :func:`expected_apps` (DESCRIPTION checked apart)."""
    got: dict = {}
    for name, value in app.items:
        assert isinstance(value, str), f"unexpected vector {name} in an app"
        assert name not in got, f"{name} twice in an app"
        if name in ("APPTEMPLATE64", "VMTEMPLATE64"):
            got[name] = parse_template(base64.b64decode(value, validate=True)).items
        elif name != "DESCRIPTION":
            got[name] = value
    return got


def check_apps(run: Run, expected: dict[str, dict]) -> None:
    assert [a.get("NAME") for a in run.apps] == list(expected)
    for app in run.apps:
        want = expected[app.get("NAME")]
        assert as_expected(app) == want
        description = app.get("DESCRIPTION") or ""
        assert want["VERSION"] in description and want["PUBLISHER"] in description


# --------------------------------------------------------------------------------------------
# Mapping, counts, newest version, layouts
# --------------------------------------------------------------------------------------------

CASES = [
    ("2023", "1", {}),
    ("2023", "4", {"SKIP_UNTESTED": "no", "ARCHITECTURES": "x86_64 ppc64le i686 s390x"}),
    ("2024", "2", {"VM_IMAGES": "yes"}),
    ("2025", "3", {"VM_IMAGES": "yes", "VM_VARIANTS": "cloud,default", "SKIP_UNTESTED": "no"}),
    ("mixed", "1", {}),
    (
        "mixed",
        "9",
        {
            "ARCHITECTURES": "x86_64 armv7l, riscv64",
            "VARIANTS": "default,cloud",
            "FORMAT": "qcow2",
            "IMAGE_SIZE_MB": "4096",
            "FILESYSTEM": "xfs",
            "PRIVILEGED": "no",
            "MEMORY": "1024",
            "CPU": "0.5",
            "VCPU": "4",
        },
    ),
    ("2024", "5", {"DISTRIBUTIONS": "ubuntu debian nixos", "VM_IMAGES": "yes"}),
    ("mixed", "6", {"ARCHITECTURES": "aarch64", "VM_IMAGES": "YES", "SKIP_UNTESTED": "no"}),
]


@pytest.mark.parametrize("release", ["7.x", "6.10"])
@pytest.mark.parametrize(("profile", "seed", "attrs"), CASES)
def test_monitor_maps_every_field(
    httpd, catalog_dir, tmp_path: Path, profile: str, seed: str, attrs: dict, release: str
) -> None:
    catalog = load(catalog_dir("--profile", profile, "--seed", seed))
    serve_catalog(httpd, catalog)
    endpoint = httpd.url + "/"
    run = run_monitor(endpoint, attrs, tmp_path, release)
    expected = expected_apps(catalog, endpoint, attrs, release=release)
    assert len(expected) >= 10  # every case exercises a real share of the catalog
    check_apps(run, expected)
    assert run.warnings == []
    assert run.stats.containers + run.stats.vm_images == len(expected)
    vm_paths = {e["SOURCE"][len(endpoint) - 1 :] for e in expected.values() if "KVM" in e["NAME"]}
    qcow2_requests = [r.path for r in httpd.requests if r.path.endswith(".qcow2")]
    assert sorted(qcow2_requests) == sorted(vm_paths)
    versions = [p["versions"][max(p["versions"])]["items"] for p in catalog["products"].values()]
    if profile == "2023":  # the pre-Incus layout: lxd.tar.xz metadata only
        assert all("lxd.tar.xz" in i and "incus.tar.xz" not in i for i in versions)
    else:
        assert all("incus.tar.xz" in i and "lxd.tar.xz" in i for i in versions)


def test_default_market_is_upstream_compatible(httpd, catalog_dir, tmp_path: Path) -> None:
    """Names, SOURCE and template of the stock driver for its products (ubuntu jammy amd64)."""
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    serve_catalog(httpd, catalog)
    endpoint = httpd.url + "/"
    run = run_monitor(httpd.url, {}, tmp_path)  # no trailing slash: added once
    by_name = {a.get("NAME"): a for a in run.apps}
    jammy = by_name["ubuntu_jammy"]  # no remotes/VERSION: the 7.x rules
    product = catalog["products"]["ubuntu:jammy:amd64:default"]
    serial = list(product["versions"])[-1]
    path = product["versions"][serial]["items"]["root.tar.xz"]["path"]
    assert jammy.get("SOURCE") == f"lxd://{endpoint}{path}?size=2048&filesystem=ext4&format=raw"
    assert jammy.get("SIZE") == "2048" and jammy.get("FORMAT") == "raw"
    assert "ubuntu_jammy (aarch64)" in by_name
    assert not any(n.endswith("- KVM") for n in by_name)  # VM images are opt-in
    assert not any(n.startswith(("archlinux", "gentoo", "nixos")) for n in by_name)


# --------------------------------------------------------------------------------------------
# Field by field against the stock drivers' output (tests/data/stock-lxc, see its README)
# --------------------------------------------------------------------------------------------

STOCK_DATA = REPO / "tests" / "data" / "stock-lxc"
IDENTITY = ("NAME", "SOURCE", "IMPORT_ID", "TYPE", "FORMAT", "ARCHITECTURE", "HYPERVISOR")
SAME_AS_STOCK = (*IDENTITY, "SIZE", "ORIGIN_ID", "REGTIME", "PUBLISHER", "LINK")
DELIBERATE = {"MD5", "VERSION", "DESCRIPTION"}
"""Top-level attributes where we differ from stock on purpose (README, "Compatibility")."""


def app_fields(app: Template, endpoint: str, stock_endpoint: str) -> dict:
    """An app as the stock data stores it: nested templates decoded, our endpoint renamed."""
    out: dict = {}
    for name, value in app.items:
        assert isinstance(value, str)
        if name in ("APPTEMPLATE64", "VMTEMPLATE64"):
            nested = parse_template(base64.b64decode(value, validate=True)).items
            out[name] = [[k, v] for k, v in nested]
        else:
            out[name] = value
    return json.loads(json.dumps(out).replace(endpoint, stock_endpoint))


@pytest.mark.parametrize(
    ("stock_file", "release"),
    [
        ("lxc-2025-7-7.5.80.json", "7.x"),
        ("lxc-2025-7-untested-7.5.80.json", "7.x"),
        ("lxc-2025-7-6.10.0.1.json", "6.10"),
        ("lxc-2025-7-untested-6.10.0.1.json", "6.10"),
    ],
)
def test_same_apps_as_the_stock_driver(
    httpd, catalog_dir, tmp_path: Path, stock_file: str, release: str
) -> None:
    stock = json.loads((STOCK_DATA / stock_file).read_text())
    assert stock["catalog"].endswith("--profile 2025 --seed 7")
    catalog = load(catalog_dir("--profile", "2025", "--seed", "7"))
    serve_catalog(httpd, catalog)
    endpoint = httpd.url + "/"
    run = run_monitor(endpoint, stock["market"], tmp_path, release)
    assert run.warnings == []
    ours = [app_fields(a, endpoint, stock["endpoint"]) for a in run.apps]
    assert [a["NAME"] for a in ours] == [a["NAME"] for a in stock["apps"]]
    for mine, theirs in zip(ours, stock["apps"], strict=True):
        for attr in SAME_AS_STOCK:
            if attr in theirs:
                assert mine[attr] == theirs[attr], (mine["NAME"], attr)
        # every stock attribute of the nested templates, with its value, and nothing else
        for nested in ("APPTEMPLATE64", "VMTEMPLATE64"):
            assert dict(map(tuple, mine[nested])) == dict(map(tuple, theirs[nested]))
        changed = {k for k in theirs if mine.get(k) != theirs[k]}
        assert changed == DELIBERATE, mine["NAME"]
        added = set(mine) - set(theirs)
        # 6.10's stock apps have no ARCHITECTURE/HYPERVISOR; ours say what 7.x says
        assert added == (set() if release == "7.x" else {"ARCHITECTURE", "HYPERVISOR"})
        assert mine["VERSION"] in mine["SOURCE"] and mine["PUBLISHER"] in mine["DESCRIPTION"]


@pytest.mark.parametrize(
    ("value", "skips"),
    [(None, True), ("yes", True), (" yes ", True), ("no", False), ("YES", False), ("1", False)],
)
def test_skip_untested_follows_stock(
    httpd, catalog_dir, tmp_path: Path, value: str | None, skips: bool
) -> None:
    """Stock skips untested distributions only for an absent or exactly ``yes`` SKIP_UNTESTED
    (one-7.0 monitor:141): any other word publishes them all."""
    catalog = load(catalog_dir("--profile", "2025", "--seed", "7"))
    serve_catalog(httpd, catalog)
    attrs = {} if value is None else {"SKIP_UNTESTED": value}
    run = run_monitor(httpd.url, attrs, tmp_path, "7.x")
    names = {a.get("NAME") for a in run.apps}
    assert ("archlinux_current" not in names) is skips
    assert "ubuntu_noble" in names and "opensuse_tumbleweed" in names


def test_newest_version_is_chosen_whatever_the_order(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "2025", "--seed", "3"))
    attrs = {"VM_IMAGES": "yes"}
    shuffled = copy.deepcopy(catalog)
    for product in shuffled["products"].values():
        product["versions"] = dict(reversed(list(product["versions"].items())))
    serve_catalog(httpd, shuffled)
    endpoint = httpd.url + "/"
    run = run_monitor(endpoint, attrs, tmp_path)
    check_apps(run, expected_apps(catalog, endpoint, attrs))
    multi = [p for p in catalog["products"].values() if len(p["versions"]) > 1]
    assert multi  # the reversal really moved the newest build away from the end
    for app in run.apps:
        assert app.get("VERSION") in app.get("SOURCE", "")


# --------------------------------------------------------------------------------------------
# Real files: qcow2 sizes against qemu-img, downloads against the catalog's sha256
# --------------------------------------------------------------------------------------------

REAL_ONLY = r"^(ubuntu:jammy:amd64:(default|cloud)|alpine:3\.19:(amd64|arm64):cloud)$"


@pytest.fixture(scope="module")
def real_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_program("qemu-img", "qemu-utils")
    out = tmp_path_factory.mktemp("lxc-real")
    args = ("--profile", "2024", "--seed", "8", "--versions", "2", "--real-bytes")
    return generate(out, *args, "--only", REAL_ONLY)


def test_real_bytes_sizes_and_downloads(httpd, real_catalog: Path, tmp_path: Path) -> None:
    httpd.add_tree(real_catalog)
    catalog = load(real_catalog)
    endpoint = httpd.url + "/"
    attrs = {"VM_IMAGES": "yes"}
    run = run_monitor(endpoint, attrs, tmp_path)

    def real_size(item: dict) -> int:
        return qemu_img_virtual_size(real_catalog / item["path"])

    expected = expected_apps(catalog, endpoint, attrs, virtual_size=real_size)
    check_apps(run, expected)
    kinds = {a.get("HYPERVISOR") for a in run.apps}
    assert kinds == {"lxc", "kvm"}
    secure = {
        parse_template(base64.b64decode(a.get("VMTEMPLATE64") or "")).get_all("OS")[0][
            "FIRMWARE_SECURE"
        ]
        for a in run.apps
        if a.get("HYPERVISOR") == "kvm" and a.get("ARCHITECTURE") == "x86_64"
    }
    assert secure == {"yes", "no"}  # ubuntu boots with secure boot, alpine cannot
    sha_by_path = {
        item["path"]: item["sha256"]
        for p in catalog["products"].values()
        for v in p["versions"].values()
        for item in v["items"].values()
    }
    with requests.Session() as session:
        for app in run.apps:
            url = app.get("SOURCE", "").removeprefix("lxd://").split("?", 1)[0]
            path = url.removeprefix(endpoint)
            body = session.get(url, timeout=30).content
            assert hashlib.sha256(body).hexdigest() == sha_by_path[path]
            if app.get("HYPERVISOR") == "kvm":
                virtual = qemu_img_virtual_size(real_catalog / path)
                assert fetch_virtual_size(session, url) == virtual
                assert app.get("SIZE") == str(math.ceil(virtual / MIB))


def test_vm_sizes_are_cached_by_sha256(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "2025", "--seed", "3"))
    serve_catalog(httpd, catalog)
    attrs = {"VM_IMAGES": "yes"}
    first = run_monitor(httpd.url, attrs, tmp_path)
    assert first.stats.ranged_requests > 0
    httpd.requests.clear()
    second = run_monitor(httpd.url, attrs, tmp_path)
    assert second.stats.ranged_requests == 0
    assert [r.path for r in httpd.requests] == [CATALOG]
    assert second.text == first.text


def test_unreadable_qcow2_header_skips_only_that_image(httpd, catalog_dir, tmp_path) -> None:
    catalog = load(catalog_dir("--profile", "2025", "--seed", "3"))
    serve_catalog(httpd, catalog)
    attrs = {"VM_IMAGES": "yes"}
    expected = expected_apps(catalog, httpd.url + "/", attrs)
    victim = next(e for e in expected.values() if e["HYPERVISOR"] == "kvm")
    del httpd.routes[victim["SOURCE"].removeprefix(httpd.url)]
    run = run_monitor(httpd.url, attrs, tmp_path)
    del expected[victim["NAME"]]
    check_apps(run, expected)
    assert len(run.warnings) == 1 and "HTTP 404" in run.warnings[0]


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


def test_500_then_200(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    httpd.routes[CATALOG] = failing_then(dump(catalog), failures=2)
    run = run_monitor(httpd.url, {}, tmp_path)
    check_apps(run, expected_apps(catalog, httpd.url + "/", {}))
    assert httpd.count(CATALOG) == 3


def test_304_with_validators_reuses_the_cached_catalog(httpd, catalog_dir, tmp_path) -> None:
    catalog = load(catalog_dir("--profile", "mixed", "--seed", "1"))
    serve_catalog(httpd, catalog)
    first = run_monitor(httpd.url, {}, tmp_path)
    second = run_monitor(httpd.url, {}, tmp_path)
    assert not first.stats.from_cache and second.stats.from_cache
    assert second.text == first.text
    validators = httpd.requests[-1].headers
    assert validators.get("If-None-Match") and validators.get("If-Modified-Since")
    assert httpd.requests[0].headers["User-Agent"] == "OpenNebula 7.0 (Market Driver)"


def test_changed_catalog_replaces_the_cached_one(httpd, catalog_dir, tmp_path) -> None:
    httpd.routes[CATALOG] = dump(load(catalog_dir("--profile", "2024", "--seed", "2")))
    run_monitor(httpd.url, {}, tmp_path)
    newer = load(catalog_dir("--profile", "2025", "--seed", "3"))
    httpd.routes[CATALOG] = dump(newer)
    run = run_monitor(httpd.url, {}, tmp_path)
    assert not run.stats.from_cache
    check_apps(run, expected_apps(newer, httpd.url + "/", {}))


@pytest.mark.parametrize(
    ("route", "expect"),
    [
        (None, "HTTP 404"),
        (b"<html><body>maintenance</body></html>", "valid JSON"),
        (b'{"content_id": "images", "products": []}', "not a simplestreams catalog"),
        (b"[]", "not a simplestreams catalog"),
        ("truncated-json", "valid JSON"),
        ("cut-connection", "truncated"),
        ("always-500", "HTTP 500"),
    ],
)
def test_catalog_failures_are_one_line_naming_the_endpoint(
    httpd, catalog_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route, expect: str
) -> None:
    monkeypatch.setattr(web, "RETRY_BACKOFF_S", 0.0)
    body = dump(load(catalog_dir("--profile", "2024", "--seed", "2")))
    if route == "truncated-json":
        route = body[: len(body) // 2]
    elif route == "cut-connection":
        route = truncated(body, len(body) // 2)
    elif route == "always-500":
        route = failing_then(body, failures=100)
    if route is not None:
        httpd.routes[CATALOG] = route
    with pytest.raises(RemoteError) as err:
        run_monitor(httpd.url, {}, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and expect in msg and httpd.url + CATALOG in msg


def test_timeout_and_refused_connection(
    httpd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(web, "RETRY_COUNT", 0)
    httpd.routes[CATALOG] = slow(1.5, b"{}")
    with pytest.raises(RemoteError, match="timed out"):
        run_monitor(httpd.url, {}, tmp_path)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError, match="connection refused") as err:
        run_monitor(closed, {}, tmp_path)
    assert closed + CATALOG in str(err.value)
    assert str(err.value).startswith("marketplace '")  # one line naming the market (issue 13)


def test_broken_products_are_skipped_with_a_warning(httpd, catalog_dir, tmp_path) -> None:
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    broken = copy.deepcopy(catalog)
    products = broken["products"]

    def newest_items(key: str) -> dict:
        versions = products[key]["versions"]
        return versions[max(versions)]["items"]

    products["ubuntu:jammy:amd64:default"]["versions"] = {}
    products["ubuntu:focal:amd64:default"]["versions"]["not-a-date"] = {"items": {}}
    del newest_items("debian:bookworm:amd64:default")["root.tar.xz"]["path"]
    newest_items("debian:bullseye:amd64:default")["root.tar.xz"]["size"] = "12"
    newest_items("alpine:3.19:amd64:default")["root.tar.xz"]["sha256"] = "zz"
    newest_items("alpine:3.18:amd64:default")["root.tar.xz"]["path"] = "../../etc/passwd"
    products["fedora:39:amd64:default"] = ["not", "an", "object"]
    products["fedora:38:amd64:default"]["versions"] = {"20240101_00:00": {"items": []}}
    products["ubuntu:mantic:amd64"] = products.pop("ubuntu:mantic:amd64:default")
    products["almalinux:9:amd64:default"]["requirements"] = "cgroup=v2"
    victims = [
        "ubuntu:jammy:amd64:default",
        "ubuntu:focal:amd64:default",
        "debian:bookworm:amd64:default",
        "debian:bullseye:amd64:default",
        "alpine:3.19:amd64:default",
        "alpine:3.18:amd64:default",
        "fedora:39:amd64:default",
        "fedora:38:amd64:default",
        "ubuntu:mantic:amd64",
        "almalinux:9:amd64:default",
    ]
    httpd.routes[CATALOG] = dump(broken)
    run = run_monitor(httpd.url, {}, tmp_path)
    gone = {*victims, "ubuntu:mantic:amd64:default"}
    kept = {k: v for k, v in catalog["products"].items() if k not in gone}
    expected = expected_apps({"products": kept}, httpd.url + "/", {})
    check_apps(run, expected)
    assert len(run.warnings) == len(victims)
    for key in victims:
        assert sum(repr(key) in w for w in run.warnings) == 1, key
    assert any("no versions" in w for w in run.warnings)


def test_warnings_are_bounded(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "mixed", "--seed", "1"))
    for product in catalog["products"].values():
        product["versions"] = {}
    httpd.routes[CATALOG] = dump(catalog)
    run = run_monitor(httpd.url, {"SKIP_UNTESTED": "no"}, tmp_path)
    assert run.apps == []
    assert len(run.warnings) == 21 and "more broken products" in run.warnings[-1]


def test_floods_are_capped_and_counted(
    httpd, catalog_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PRODUCTS nothing is read; a product with too many builds is skipped before its
    serials are parsed; a build's items are searched for a disk only up to MAX_ITEMS; every
    skip is counted in a bounded number of WARN lines."""
    monkeypatch.setattr(lxc, "MAX_PRODUCTS", 400)
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    real = copy.deepcopy(catalog["products"])
    assert len(real) < 400
    products = catalog["products"]
    jammy = products["ubuntu:jammy:amd64:default"]
    # serials that are not dates: an error if they were parsed
    jammy["versions"] = {f"2024{i:08d}": {"items": {}} for i in range(50_000)}
    cloud = products["ubuntu:jammy:amd64:cloud"]
    newest = cloud["versions"][max(cloud["versions"])]["items"]
    disk = newest.pop("disk.qcow2")
    for i in range(5_000):
        newest[f"junk{i}"] = {"ftype": "junk"}
    newest["late"] = disk  # a disk past MAX_ITEMS under an unusual key is not looked for
    for i in range(3_000):
        products[f"ubuntu:flood{i}:amd64:default"] = {"versions": {}}
    serve_catalog(httpd, catalog)
    attrs = {"VM_IMAGES": "yes"}
    run = run_monitor(httpd.url, attrs, tmp_path, "7.x")
    del real["ubuntu:jammy:amd64:default"]
    expected = expected_apps({"products": real}, httpd.url + "/", attrs)
    del expected["ubuntu_jammy_cloud - KVM"]
    check_apps(run, expected)
    assert len(run.warnings) == lxc.MAX_WARNINGS + 2
    assert "'ubuntu:jammy:amd64:default': product has 50000 builds" in run.warnings[0]
    more = len(real) + 1 + 3_000 - 400  # products past the cap
    assert run.warnings[-1].endswith(f"{more} products past the first 400 not read")
    assert "more broken products skipped" in run.warnings[-2]


def test_bytes_that_are_not_utf8_cost_only_their_entry(httpd, catalog_dir, tmp_path) -> None:
    """Invalid UTF-8 becomes U+FFFD (web.decode_text): in a description it is published as
    such, in a path it makes that one product unusable; every other app is published."""
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    products = catalog["products"]
    products["ubuntu:jammy:amd64:default"]["os"] = "UbuQQntu"
    focal = products["ubuntu:focal:amd64:default"]
    items = focal["versions"][max(focal["versions"])]["items"]
    items["root.tar.xz"]["path"] = items["root.tar.xz"]["path"].replace("rootfs", "ZZrootfs")
    body = dump(catalog).replace(b"QQ", b"\xff\xfe").replace(b"ZZ", b"\xc3\x28")
    httpd.routes[CATALOG] = body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    run = run_monitor(httpd.url, {}, tmp_path, "7.x")
    del products["ubuntu:focal:amd64:default"]
    check_apps(run, expected_apps(catalog, httpd.url + "/", {}))
    jammy = next(a for a in run.apps if a.get("NAME") == "ubuntu_jammy")
    assert "Ubu\ufffd\ufffdntu jammy" in (jammy.get("DESCRIPTION") or "")
    assert len(run.warnings) == 1
    assert "'ubuntu:focal:amd64:default'" in run.warnings[0] and "no usable path" in run.warnings[0]


@pytest.mark.parametrize(
    ("cap", "value", "expect"),
    [
        ("MAX_CATALOG_BYTES", 100_000, "answered more than 100000 bytes"),
        ("MAX_JSON_VALUES", 20_000, "more than 20000 values"),
    ],
)
def test_oversized_catalogs_are_refused_in_one_line(
    httpd, catalog_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap, value, expect
) -> None:
    """Memory is bounded before parsing: by the body size, then by the number of JSON values
    (``[{},{},...]`` costs ~38 bytes of memory per 3 bytes of answer)."""
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    catalog["padding"] = [{}] * 30_000
    httpd.routes[CATALOG] = dump(catalog)
    assert run_monitor(httpd.url, {}, tmp_path / "real", "7.x").apps  # under the real caps
    monkeypatch.setattr(lxc, cap, value)
    with pytest.raises(RemoteError) as err:
        run_monitor(httpd.url, {}, tmp_path / "capped", "7.x")
    msg = str(err.value)
    assert "\n" not in msg and expect in msg and httpd.url + CATALOG in msg


def test_log_lines_escape_catalog_text(httpd, catalog_dir, tmp_path: Path) -> None:
    """A catalog cannot forge log lines: its text is quoted and made one line (one_line:
    line breaks joined with '; ', other control characters blanked)."""
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    products = catalog["products"]
    evil = "ubuntu:x\nLOG E 777 pwned\r\x1b[31m\u2028:amd64:default"
    products[evil] = {"versions": {"20240101_00:00\nLOG W 1300": {"items": {}}}}
    products["ubuntu:y:amd64:default"] = {
        "versions": {"20240101_00:00": {"items": {"root.tar.xz": {"path": "a\nb"}}}}
    }
    httpd.routes[CATALOG] = dump(catalog)
    run = run_monitor(httpd.url, {}, tmp_path, "7.x")
    lines = run.log.splitlines()
    assert len(lines) == 2 and all(line.startswith("WARN: linuxcontainers: ") for line in lines)
    assert "'ubuntu:x; LOG E 777 pwned; [31m :amd64:default'" in lines[0]
    assert "'20240101_00:00; LOG W 1300'" in lines[0]
    assert "'root.tar.xz' has no usable path" in lines[1]
    assert "\x1b" not in run.log and "\u2028" not in run.log


def test_endpoint_credentials_stay_in_source(httpd, catalog_dir, tmp_path: Path) -> None:
    """A password in ENDPOINT is kept where a download needs it (SOURCE) and nowhere else:
    not in PUBLISHER, LINK, DESCRIPTION, the nested templates or a log line."""
    catalog = load(catalog_dir("--profile", "2025", "--seed", "3"))
    secret = "s3cr3t-Pa55"
    endpoint = httpd.url.replace("http://", f"http://reader:{secret}@") + "/"
    attrs = {"VM_IMAGES": "yes"}
    expected = expected_apps(catalog, endpoint, attrs)
    catalog["products"]["ubuntu:broken:amd64:default"] = {"versions": {}}
    serve_catalog(httpd, catalog)
    run = run_monitor(endpoint, attrs, tmp_path, "7.x")
    check_apps(run, expected)
    assert {a.get("PUBLISHER") for a in run.apps} == {httpd.url + "/"}
    for app in run.apps:
        for name, value in app.items:
            if name in ("APPTEMPLATE64", "VMTEMPLATE64"):
                value = base64.b64decode(value).decode()
            if name == "SOURCE":
                assert f"reader:{secret}@" in value
            else:
                assert secret not in value and "reader" not in value, (name, value)
    assert run.warnings and secret not in run.log
    cached = [f for f in (tmp_path / "var" / "cache" / "market").rglob("*") if f.is_file()]
    assert cached and not any(secret.encode() in f.read_bytes() for f in cached)
    assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in httpd.requests)


@pytest.mark.parametrize(
    ("release", "names"),
    [
        ("6.10", ['ubuntu_ja"m]] >my\\ - LXC', "ubuntu_x; y - LXC"]),
        ("7.x", ['ubuntu_ja"m]] >my\\ ', "ubuntu_x; y"]),  # a final backslash gets a space
    ],
)
def test_hostile_catalog_text_cannot_break_the_output(
    httpd, catalog_dir, tmp_path, release: str, names: list[str]
) -> None:
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    product = catalog["products"].pop("ubuntu:jammy:amd64:default")
    product["os"] = 'Ubu"ntu ]]> \\'
    catalog["products"]['ubuntu:ja"m]]>my\\:amd64:default'] = product
    catalog["products"]["ubuntu:x\ny:amd64:default"] = copy.deepcopy(product)
    httpd.routes[CATALOG] = dump(catalog)
    run = run_monitor(httpd.url, {}, tmp_path, release)
    published = [a.get("NAME") or "" for a in run.apps]
    assert all(name in published for name in names), published


def test_colliding_names_keep_the_first(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "2024", "--seed", "2"))
    product = catalog["products"]["ubuntu:jammy:amd64:default"]
    catalog["products"] = {
        "acme:b_c:amd64:default": product,
        "acme:b:amd64:c": copy.deepcopy(product),
    }
    httpd.routes[CATALOG] = dump(catalog)
    run = run_monitor(httpd.url, {"DISTRIBUTIONS": "acme", "VARIANTS": "default c"}, tmp_path)
    assert [a.get("NAME") for a in run.apps] == ["acme_b_c"]
    assert len(run.warnings) == 1 and "'acme_b_c'" in run.warnings[0]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_option_defaults() -> None:
    opts = LxcOptions.from_market(Market(1, "m", "linuxcontainers", {}))
    assert opts.catalog_url == "https://images.linuxcontainers.org/streams/v1/images.json"
    assert (opts.image_size_mb, opts.filesystem, opts.format) == (2048, "ext4", "raw")
    assert (opts.memory, opts.cpu, opts.vcpu, opts.privileged) == ("768", "1", "2", True)
    assert opts.skip_untested and not opts.vm_images
    assert opts.variants == ("default",) and opts.vm_variants == ("cloud",)
    assert opts.architectures == ("x86_64", "aarch64") and opts.distributions == ()
    assert opts.rules.line == "7.x"  # no release given: the 7.x rules
    lts = LxcOptions.from_market(Market(1, "m", "linuxcontainers", {}), ReleaseLine.of("6.10.0.1"))
    assert lts.architectures == ("x86_64",) and lts.rules.line == "6.10"
    assert (
        "alt" in lts.rules.tested_distributions and "opensuse" not in lts.rules.tested_distributions
    )
    assert (
        "opensuse" in opts.rules.tested_distributions
        and "alt" not in opts.rules.tested_distributions
    )


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("FORMAT", "vmdk"),
        ("ARCHITECTURES", "x86_64 sparc"),
        ("IMAGE_SIZE_MB", "big"),
        ("IMAGE_SIZE_MB", "-5"),
        ("MEMORY", "0"),
        ("CPU", "many"),
        ("ENDPOINT", "ftp://example.org/"),
        ("ENDPOINT", "https://example.org/?x=1"),
        ("FILESYSTEM", "ext4;rm -rf"),
        ("VARIANTS", "default ../x"),
    ],
)
def test_bad_options_are_one_line_config_errors(attr: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        LxcOptions.from_market(Market(1, "lxc", "linuxcontainers", {attr: value}))
    msg = str(err.value)
    assert "\n" not in msg and attr in msg and "'lxc'" in msg


def test_a_malformed_endpoint_is_a_config_error_without_its_password() -> None:
    market = Market(1, "lxc", "linuxcontainers", {"ENDPOINT": "http://u:s3cr3t-pw@[::1/"})
    with pytest.raises(ConfigError) as err:
        LxcOptions.from_market(market)
    assert str(err.value) == (
        "marketplace 'lxc': ENDPOINT is not a valid URL "
        "(unbalanced '[' or ']' around an IPv6 address)"
    )


# --------------------------------------------------------------------------------------------
# End to end through the action script
# --------------------------------------------------------------------------------------------


def action_payload(template: dict[str, str]) -> str:
    inner = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in template.items())
    xml = (
        "<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><ID>1</ID><NAME>Linux Containers</NAME>"
        f"<MARKET_MAD>linuxcontainers</MARKET_MAD><TEMPLATE>{inner}</TEMPLATE>"
        "</MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(xml.encode()).decode()


def run_script(payload: str, one_location: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ONE_LOCATION=str(one_location), NO_PROXY="127.0.0.1,localhost")
    env.pop("ONE_MARKET_DEBUG", None)
    return subprocess.run(
        [sys.executable, "remotes/market/linuxcontainers/monitor", payload, "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
    )


def test_action_script_end_to_end(httpd, catalog_dir, tmp_path: Path) -> None:
    catalog = load(catalog_dir("--profile", "2025", "--seed", "3"))
    serve_catalog(httpd, catalog)
    attrs = {"VM_IMAGES": "yes", "ARCHITECTURES": "x86_64"}
    proc = run_script(action_payload({"ENDPOINT": httpd.url + "/", **attrs}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    top = parse_template(proc.stdout.decode())
    apps = [parse_template(base64.b64decode(v)) for v in top.get_all("APP")]
    run = Run(proc.stdout.decode(), apps, [], CatalogStats())
    check_apps(run, expected_apps(catalog, httpd.url + "/", attrs))
    assert (tmp_path / "var" / "cache" / "market").is_dir()

    del httpd.routes[CATALOG]
    failed = run_script(action_payload({"ENDPOINT": httpd.url + "/"}), tmp_path)
    assert failed.returncode != 0 and failed.stdout == b""
    lines = failed.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "HTTP 404" in lines[0] and httpd.url + CATALOG in lines[0]
