"""Linux Containers image server catalog (``linuxcontainers`` driver, monitor only).

Reads the simplestreams ``streams/v1/images.json`` of images.linuxcontainers.org (or a mirror
named by ``ENDPOINT``) and publishes:

* **container apps**, compatible with the stock driver: same NAME for the products it lists
  (``<distro>_<release> - LXC``), the same ``lxd://`` SOURCE read by the stock datastore
  downloader, SIZE = ``IMAGE_SIZE_MB``, REGTIME from the build serial and the same LXC VM
  template, so that switching drivers updates the apps oned already has instead of replacing
  them. Beyond upstream: other architectures and variants (their names get a suffix), a real
  MD5 and a VERSION that says which build is published;
* **KVM VM images** (``VM_IMAGES=yes``): the ``disk.qcow2`` of the configured variants as
  qcow2 IMAGE apps whose SIZE is the virtual disk size read from the qcow2 header.

The catalog is fetched with a conditional GET (an unchanged catalog costs a 304). Broken
products are skipped with a ``WARN:`` line; a failed fetch is one ``RemoteError`` line.

MD5 (oned compares it to tell whether an app changed; it is not checked against a download,
oned hands it to the image as ``FROM_APP_MD5``): the md5 of a text made of a kind tag, the
item's sha256 and the options that shape the image, one per line:

* container: ``lxc-rootfs``, sha256 of ``root.tar.xz``, IMAGE_SIZE_MB, FILESYSTEM, FORMAT;
* KVM image: ``kvm-qcow2``, sha256 of ``disk.qcow2`` (published as-is, no option shapes it).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .. import driverlog
from ..action import Market
from ..backends.base import AppEntry, Backend, MonitorResult
from ..errors import ConfigError, RemoteError, one_line
from ..template import write_template
from ..web import CachedFetcher, fetch_json, make_session
from .qcow2 import VirtualSizeCache, virtual_sizes

DRIVER = "linuxcontainers"
DEFAULT_ENDPOINT = "https://images.linuxcontainers.org/"
CATALOG_PATH = "streams/v1/images.json"

DEFAULT_IMAGE_SIZE_MB = 2048
MAX_IMAGE_SIZE_MB = 16 * 1024 * 1024
"""Largest IMAGE_SIZE_MB accepted (16 TiB): a larger value is a typo."""
DEFAULT_FILESYSTEM = "ext4"
DEFAULT_FORMAT = "raw"
CONTAINER_FORMATS = ("raw", "qcow2")
DEFAULT_MEMORY_MB = "768"
DEFAULT_CPU = "1"
DEFAULT_VCPU = "2"
DEFAULT_VARIANTS = ("default",)
DEFAULT_ARCHITECTURES = ("x86_64", "aarch64")
DEFAULT_VM_VARIANTS = ("cloud",)

TESTED_DISTRIBUTIONS = (
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
)
"""Distributions the stock driver lists when SKIP_UNTESTED=yes (its downloader can
contextualize them)."""

ONE_TO_SIMPLESTREAMS_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "i686": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
"""OpenNebula (kernel) architecture names -> the Debian-style names of the image server."""
SIMPLESTREAMS_TO_ONE_ARCH = {v: k for k, v in ONE_TO_SIMPLESTREAMS_ARCH.items()}

CONTAINER_FTYPE = "root.tar.xz"
VM_FTYPE = "disk-kvm.img"
SERIAL_FORMATS = ("%Y%m%d_%H:%M", "%Y%m%d_%H%M")
"""Build serials: linuxcontainers.org writes ``20240110_07:42``, Canonical's server
``20240110_0742``."""

LXC_SCHED_HYPERVISOR = 'HYPERVISOR="lx*"'
KVM_DEV_PREFIX = "vd"
OVMF_CODE_X86_64 = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_SECBOOT_CODE_X86_64 = "/usr/share/OVMF/OVMF_CODE.secboot.fd"
"""x86_64 UEFI firmware: oned accepts only paths listed in OVMF_UEFIS (vmm_exec_kvm.conf), and
these two are in its default list; the secure-boot build is used unless the image says it
cannot boot with secure boot (``requirements.secureboot: "false"``)."""
AARCH64_OS = {
    "ARCH": "aarch64",
    "FIRMWARE": "/usr/share/AAVMF/AAVMF_CODE.fd",
    "FIRMWARE_SECURE": "no",
    "MACHINE": "virt",
}
"""aarch64 VMs: the OS section the ``one`` catalog driver also uses."""
CONTEXT = {"NETWORK": "YES", "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]", "SET_HOSTNAME": "$NAME"}
GRAPHICS = {"LISTEN": "0.0.0.0", "TYPE": "vnc"}

MAX_WARNINGS = 20
"""WARN lines for broken products in one monitor; the rest are counted in one last line."""
MAX_NAME_PART_CHARS = 64
_SAFE_PATH_RE = re.compile(r"[A-Za-z0-9._~:@+,=/-]+")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_FS_RE = re.compile(r"[a-z0-9]{1,16}")


class ProductError(ValueError):
    """One catalog product is malformed: it is skipped with a WARN line."""


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _split_list(value: str) -> tuple[str, ...]:
    """``a, b c`` -> ``("a", "b", "c")`` (comma or blank separated, duplicates dropped)."""
    out: list[str] = []
    for part in re.split(r"[,\s]+", value.strip()):
        if part and part not in out:
            out.append(part)
    return tuple(out)


@dataclass(frozen=True)
class LxcOptions:
    """Market attributes of a ``linuxcontainers`` marketplace, validated."""

    endpoint: str = DEFAULT_ENDPOINT
    image_size_mb: int = DEFAULT_IMAGE_SIZE_MB
    filesystem: str = DEFAULT_FILESYSTEM
    format: str = DEFAULT_FORMAT
    skip_untested: bool = True
    memory: str = DEFAULT_MEMORY_MB
    cpu: str = DEFAULT_CPU
    vcpu: str = DEFAULT_VCPU
    privileged: bool = True
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    architectures: tuple[str, ...] = DEFAULT_ARCHITECTURES
    distributions: tuple[str, ...] = ()
    vm_images: bool = False
    vm_variants: tuple[str, ...] = DEFAULT_VM_VARIANTS

    @property
    def catalog_url(self) -> str:
        return self.endpoint + CATALOG_PATH

    def distribution_allowed(self, distro: str) -> bool:
        if self.distributions:
            return distro in self.distributions
        return not self.skip_untested or distro in TESTED_DISTRIBUTIONS

    @classmethod
    def from_market(cls, market: Market) -> LxcOptions:
        where = f"marketplace '{market.name}' ({DRIVER})"

        def bad(attr: str, value: str, expected: str) -> ConfigError:
            return ConfigError(f"{where}: {attr}={one_line(value, 80)!r} is invalid: {expected}")

        def flag(attr: str, default: bool) -> bool:
            value = market.attr(attr)
            if value is None:
                return default
            word = value.strip().lower()
            if word in ("yes", "true", "1", "on"):
                return True
            if word in ("no", "false", "0", "off"):
                return False
            raise bad(attr, value, "expected yes or no")

        def number(attr: str, default: str, kind: type) -> str:
            value = (market.attr(attr) or default).strip()
            try:
                parsed = kind(value)
            except ValueError:
                raise bad(attr, value, "expected a positive number") from None
            if not parsed > 0:
                raise bad(attr, value, "expected a positive number")
            return value

        def words(attr: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = market.attr(attr)
            if value is None:
                return default
            items = tuple(w.lower() for w in _split_list(value))
            for w in items:
                if not _WORD_RE.fullmatch(w):
                    raise bad(attr, value, f"{w!r} is not a valid name")
            return items or default

        endpoint = (market.attr("ENDPOINT") or DEFAULT_ENDPOINT).strip()
        driverlog.redact_url(endpoint)
        if not re.fullmatch(r"https?://[^\s?#]+", endpoint):
            raise bad("ENDPOINT", endpoint, "expected an http(s) URL without query")
        if not endpoint.endswith("/"):
            endpoint += "/"

        size = number("IMAGE_SIZE_MB", str(DEFAULT_IMAGE_SIZE_MB), int)
        if int(size) > MAX_IMAGE_SIZE_MB:
            raise bad("IMAGE_SIZE_MB", size, f"at most {MAX_IMAGE_SIZE_MB}")
        filesystem = (market.attr("FILESYSTEM") or DEFAULT_FILESYSTEM).strip().lower()
        if not _FS_RE.fullmatch(filesystem):
            raise bad("FILESYSTEM", filesystem, "expected a file system name such as ext4")
        fmt = (market.attr("FORMAT") or DEFAULT_FORMAT).strip().lower()
        if fmt not in CONTAINER_FORMATS:
            raise bad("FORMAT", fmt, "expected raw or qcow2")

        arch_value = market.attr("ARCHITECTURES")
        architectures: list[str] = []
        for arch in _split_list(arch_value) if arch_value else DEFAULT_ARCHITECTURES:
            one_arch = SIMPLESTREAMS_TO_ONE_ARCH.get(arch, arch)
            if one_arch not in ONE_TO_SIMPLESTREAMS_ARCH:
                known = ", ".join(ONE_TO_SIMPLESTREAMS_ARCH)
                raise bad("ARCHITECTURES", arch_value or "", f"{arch!r} is not one of {known}")
            if one_arch not in architectures:
                architectures.append(one_arch)

        return cls(
            endpoint=endpoint,
            image_size_mb=int(size),
            filesystem=filesystem,
            format=fmt,
            skip_untested=flag("SKIP_UNTESTED", True),
            memory=number("MEMORY", DEFAULT_MEMORY_MB, int),
            cpu=number("CPU", DEFAULT_CPU, float),
            vcpu=number("VCPU", DEFAULT_VCPU, int),
            privileged=flag("PRIVILEGED", True),
            variants=words("VARIANTS", DEFAULT_VARIANTS),
            architectures=tuple(architectures or DEFAULT_ARCHITECTURES),
            distributions=words("DISTRIBUTIONS", ()),
            vm_images=flag("VM_IMAGES", False),
            vm_variants=words("VM_VARIANTS", DEFAULT_VM_VARIANTS),
        )


# --------------------------------------------------------------------------------------------
# Catalog reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One downloadable file of a build."""

    ftype: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Build:
    """The newest build of one product, with the items this driver can publish."""

    distro: str
    release: str
    arch: str  # OpenNebula name
    variant: str
    os_name: str
    serial: str
    regtime: int
    requirements: Mapping[str, str]
    rootfs: Item | None
    disk: Item | None


def parse_serial(serial: object) -> int:
    """Epoch (UTC) of a build serial; ProductError when it is not one."""
    if isinstance(serial, str):
        for fmt in SERIAL_FORMATS:
            try:
                when = dt.datetime.strptime(serial, fmt)
            except ValueError:
                continue
            return int(when.replace(tzinfo=dt.UTC).timestamp())
    raise ProductError(f"bad build serial {one_line(str(serial), 40)!r}")


def _item(name: str, raw: object) -> Item:
    if not isinstance(raw, dict):
        raise ProductError(f"item {name!r} is not an object")
    path, sha, size = raw.get("path"), raw.get("sha256"), raw.get("size")
    if not isinstance(path, str) or not _SAFE_PATH_RE.fullmatch(path):
        raise ProductError(f"item {name!r} has no usable path")
    if path.startswith("/") or ".." in path.split("/"):
        raise ProductError(f"item {name!r} path leaves the server root")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha.lower()):
        raise ProductError(f"item {name!r} has no valid sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ProductError(f"item {name!r} has no valid size")
    return Item(ftype=str(raw.get("ftype", "")), path=path, sha256=sha.lower(), size=size)


def _find_item(items: Mapping[str, object], ftype: str) -> Item | None:
    """The item of ``ftype`` (by the key upstream uses, else by its ftype field)."""
    if ftype in items:
        return _item(ftype, items[ftype])
    for name, raw in items.items():
        if isinstance(raw, dict) and raw.get("ftype") == ftype:
            return _item(name, raw)
    return None


def newest_build(key: str, product: object, want_rootfs: bool, want_disk: bool) -> Build:
    """Parse one product and its newest build; ProductError if it is malformed."""
    parts = key.split(":")
    if len(parts) != 4 or not all(parts):
        raise ProductError("product key is not distro:release:arch:variant")
    distro, release, ss_arch, variant = parts
    if not isinstance(product, dict):
        raise ProductError("product is not an object")
    versions = product.get("versions")
    if not isinstance(versions, dict) or not versions:
        raise ProductError("product has no versions")
    # the server inserts builds oldest first; take the newest by date, whatever the order
    dated = [(parse_serial(serial), serial) for serial in versions]
    regtime, serial = max(dated)
    version = versions[serial]
    items = version.get("items") if isinstance(version, dict) else None
    if not isinstance(items, dict):
        raise ProductError(f"build {serial} has no items")
    requirements = product.get("requirements", product.get("lxd_requirements", {}))
    if requirements is None:
        requirements = {}
    if not isinstance(requirements, dict):
        raise ProductError("requirements is not an object")
    os_name = product.get("os", distro.title())
    if not isinstance(os_name, str):
        raise ProductError("os is not a string")
    return Build(
        distro=distro,
        release=release,
        arch=SIMPLESTREAMS_TO_ONE_ARCH.get(ss_arch, ss_arch),
        variant=variant,
        os_name=os_name,
        serial=serial,
        regtime=regtime,
        requirements={str(k): str(v) for k, v in requirements.items()},
        rootfs=_find_item(items, CONTAINER_FTYPE) if want_rootfs else None,
        disk=_find_item(items, VM_FTYPE) if want_disk else None,
    )


def _warn_product(key: str, reason: str) -> None:
    driverlog.warn(f"{DRIVER}: skipping product {one_line(key, 120)!r}: {reason}")


def select_builds(catalog: object, opts: LxcOptions, url: str) -> list[Build]:
    """Newest build of every product the options ask for, in catalog order."""
    products = catalog.get("products") if isinstance(catalog, dict) else None
    if not isinstance(products, dict):
        raise RemoteError(f"{url} is not a simplestreams catalog (no products object)")
    wanted_arches = {ONE_TO_SIMPLESTREAMS_ARCH[a] for a in opts.architectures}
    builds: list[Build] = []
    skipped = 0
    for key, product in products.items():
        parts = key.split(":") if isinstance(key, str) else []
        if len(parts) == 4:
            distro, _release, arch, variant = parts
            want_ct = variant in opts.variants
            want_vm = opts.vm_images and variant in opts.vm_variants
            if arch not in wanted_arches or not (want_ct or want_vm):
                continue
            if not opts.distribution_allowed(distro):
                continue
        else:
            want_ct = want_vm = True
        try:
            build = newest_build(str(key), product, want_ct, want_vm)
        except ProductError as exc:
            skipped += 1
            if skipped <= MAX_WARNINGS:
                _warn_product(str(key), str(exc))
            continue
        if build.rootfs is None and build.disk is None:
            continue  # nothing of the wanted kind in the newest build (a VM-only product)
        builds.append(build)
    if skipped > MAX_WARNINGS:
        driverlog.warn(f"{DRIVER}: {skipped - MAX_WARNINGS} more broken products skipped")
    return builds


# --------------------------------------------------------------------------------------------
# Apps
# --------------------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def derived_md5(kind: str, sha256: str, *options: object) -> str:
    """MD5 that changes exactly when the published image would (see the module docstring)."""
    text = "\n".join([kind, sha256, *(str(o) for o in options)])
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _name_base(build: Build) -> str:
    base = f"{build.distro}_{build.release}"
    if build.variant != "default":
        base += f"_{build.variant}"
    return one_line(base, MAX_NAME_PART_CHARS)


def _arch_suffix(build: Build) -> str:
    return "" if build.arch == "x86_64" else f" ({build.arch})"


def container_name(build: Build) -> str:
    """Upstream's ``<distro>_<release> - LXC``; other variants and arches get a suffix."""
    return f"{_name_base(build)} - LXC{_arch_suffix(build)}"


def vm_name(build: Build) -> str:
    """``<distro>_<release>_<variant> - KVM``: never equal to a container name."""
    return f"{_name_base(build)} - KVM{_arch_suffix(build)}"


def sched_requirements(hypervisor: str, arch: str) -> str:
    return f'{hypervisor} & ARCH="{arch}"'


def lxc_vm_template(opts: LxcOptions, build: Build) -> str:
    """The stock driver's LXC template, restricted to hosts of the image's architecture."""
    return write_template(
        [
            ("SCHED_REQUIREMENTS", sched_requirements(LXC_SCHED_HYPERVISOR, build.arch)),
            ("CPU", opts.cpu),
            ("VCPU", opts.vcpu),
            ("MEMORY", opts.memory),
            ("LXC_UNPRIVILEGED", "false" if opts.privileged else "true"),
            ("GRAPHICS", GRAPHICS),
            ("CONTEXT", CONTEXT),
        ]
    )


def kvm_os_section(build: Build) -> dict[str, str]:
    if build.arch == "aarch64":
        return dict(AARCH64_OS)
    if build.arch == "x86_64":
        secure = build.requirements.get("secureboot", "").lower() != "false"
        return {
            "ARCH": "x86_64",
            "FIRMWARE": OVMF_SECBOOT_CODE_X86_64 if secure else OVMF_CODE_X86_64,
            "FIRMWARE_SECURE": "yes" if secure else "no",
            "MACHINE": "q35",
        }
    return {"ARCH": build.arch}


def kvm_vm_template(opts: LxcOptions, build: Build) -> str:
    return write_template(
        [
            ("SCHED_REQUIREMENTS", sched_requirements('HYPERVISOR="kvm"', build.arch)),
            ("CPU", opts.cpu),
            ("VCPU", opts.vcpu),
            ("MEMORY", opts.memory),
            ("OS", kvm_os_section(build)),
            ("NIC_DEFAULT", {"MODEL": "virtio"}),
            ("GRAPHICS", GRAPHICS),
            ("CONTEXT", CONTEXT),
        ]
    )


def _build_fields(opts: LxcOptions, build: Build, path: str, kind: str) -> dict[str, object]:
    """AppEntry fields every app of one build shares, container or KVM image."""
    return {
        "import_id": "-1",
        "publisher": opts.endpoint,
        "description": (
            f"{build.os_name} {build.release} {build.variant} {kind} for {build.arch} "
            f"(build {build.serial}), downloaded from {opts.endpoint}"
        ),
        "version": build.serial,
        "regtime": build.regtime,
        "link": opts.endpoint + path,
        "architecture": build.arch,
    }


def container_app(opts: LxcOptions, build: Build) -> AppEntry:
    item = build.rootfs
    assert item is not None
    query = f"size={opts.image_size_mb}&filesystem={opts.filesystem}&format={opts.format}"
    return AppEntry(
        name=container_name(build),
        source=f"lxd://{opts.endpoint}{item.path}?{query}",
        format=opts.format,
        size_mb=opts.image_size_mb,
        md5=derived_md5(
            "lxc-rootfs", item.sha256, opts.image_size_mb, opts.filesystem, opts.format
        ),
        hypervisor="lxc",
        apptemplate64=_b64(write_template([("DRIVER", opts.format)])),
        vmtemplate64=_b64(lxc_vm_template(opts, build)),
        **_build_fields(opts, build, item.path, "container"),  # type: ignore[arg-type]
    )


def vm_app(opts: LxcOptions, build: Build, virtual_size: int) -> AppEntry:
    item = build.disk
    assert item is not None
    return AppEntry(
        name=vm_name(build),
        source=opts.endpoint + item.path,
        format="qcow2",
        size_mb=max(1, -(-virtual_size // (1024 * 1024))),
        md5=derived_md5("kvm-qcow2", item.sha256),
        hypervisor="kvm",
        apptemplate64=_b64(write_template([("DEV_PREFIX", KVM_DEV_PREFIX), ("DRIVER", "qcow2")])),
        vmtemplate64=_b64(kvm_vm_template(opts, build)),
        **_build_fields(opts, build, item.path, "UEFI KVM disk image"),  # type: ignore[arg-type]
    )


@dataclass
class CatalogStats:
    """What one monitor did (for logs and the benchmark)."""

    from_cache: bool = False
    products: int = 0
    containers: int = 0
    vm_images: int = 0
    ranged_requests: int = 0


def build_apps(
    opts: LxcOptions, builds: Iterable[Build], sizes: Mapping[str, int]
) -> list[AppEntry]:
    """Apps in catalog order; a name already used (odd release names) is skipped with a WARN."""
    apps: list[AppEntry] = []
    seen: set[str] = set()
    for build in builds:
        candidates: list[AppEntry] = []
        if build.rootfs is not None and build.variant in opts.variants:
            candidates.append(container_app(opts, build))
        if build.disk is not None and opts.vm_images and build.variant in opts.vm_variants:
            size = sizes.get(build.disk.sha256)
            if size is not None:
                candidates.append(vm_app(opts, build, size))
        for app in candidates:
            if app.name in seen:
                driverlog.warn(
                    f"{DRIVER}: two products give the app name {app.name!r}; keeping the first"
                )
                continue
            seen.add(app.name)
            apps.append(app)
    return apps


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


class LinuxContainersCatalog(Backend):
    """Public catalog of images.linuxcontainers.org: monitor only."""

    driver = DRIVER

    def user_agent(self) -> str:
        return f"OpenNebula {self.context.installation.one_version()} (Market Driver)"

    def monitor(self) -> MonitorResult:
        result, _stats = self.monitor_with_stats()
        return result

    def monitor_with_stats(self) -> tuple[MonitorResult, CatalogStats]:
        opts = LxcOptions.from_market(self.market)
        cache_dir = self.context.installation.cache_dir
        session = make_session(self.user_agent())
        stats = CatalogStats()
        try:
            catalog, stats.from_cache = fetch_json(
                CachedFetcher(session, cache_dir), opts.catalog_url
            )
            builds = select_builds(catalog, opts, opts.catalog_url)
            stats.products = len(builds)
            sizes: dict[str, int] = {}
            if opts.vm_images:
                wanted = {
                    b.disk.sha256: opts.endpoint + b.disk.path
                    for b in builds
                    if b.disk is not None and b.variant in opts.vm_variants
                }
                lookup = virtual_sizes(session, wanted, VirtualSizeCache.in_dir(cache_dir))
                stats.ranged_requests = lookup.requests
                for error in list(lookup.failures.values())[:MAX_WARNINGS]:
                    driverlog.warn(f"{DRIVER}: skipping a KVM image: {error}")
                if lookup.not_tried:
                    driverlog.warn(
                        f"{DRIVER}: {lookup.not_tried} more KVM images skipped "
                        "after repeated failures to read their qcow2 header"
                    )
                sizes = lookup.sizes
        finally:
            session.close()
        apps = build_apps(opts, builds, sizes)
        stats.containers = sum(1 for a in apps if a.hypervisor == "lxc")
        stats.vm_images = sum(1 for a in apps if a.hypervisor == "kvm")
        driverlog.debug(
            f"{DRIVER}: {stats.containers} container and {stats.vm_images} KVM apps from "
            f"{opts.catalog_url}{' (unchanged)' if stats.from_cache else ''}"
        )
        return MonitorResult(used_mb=0, free_mb=0, total_mb=0, apps=apps), stats
