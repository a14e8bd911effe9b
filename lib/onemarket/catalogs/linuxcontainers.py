"""Linux Containers image server catalog (``linuxcontainers`` driver, monitor only).

Reads the simplestreams ``streams/v1/images.json`` of images.linuxcontainers.org (or a mirror
named by ``ENDPOINT``) and publishes **container apps** exactly as the stock monitor of the
installed OpenNebula release does (``Installation.release_line()``, read from
``remotes/VERSION`` as the stock script does), so that switching drivers keeps every app id:
oned identifies a monitored app by its NAME alone and only rewrites it when VERSION, MD5 or
SOURCE changed (``MarketPlaceAppPool::import``, master:src/market/MarketPlaceAppPool.cc:141-150,
one-6.10:src/market/MarketPlaceAppPool.cc:233-240). Opt-in extras (other variants and
architectures, whose names get a suffix, and **KVM VM images**, ``VM_IMAGES=yes``: the
``disk.qcow2`` of the configured variants, SIZE = virtual disk size read from the qcow2 header)
never take a name the stock driver uses.

Stock rules (``src/market_mad/remotes/linuxcontainers/{monitor,lxd.rb}`` of OpenNebula/one;
7.0, 7.2, 7.4 and master are identical apart from the copyright line, so line numbers are the
same on each 7.x branch):

* every release: products ``distro:release:arch:variant`` with variant ``default``
  (one-6.10 monitor:120, one-7.0 monitor:140); distributions limited to a tested list unless
  SKIP_UNTESTED is set to anything but exactly ``yes`` (one-6.10 monitor:121, one-7.0
  monitor:141); the build is the last key of ``versions`` (monitor:124 / :155; we take the
  newest serial, the same on the real server, which inserts builds oldest first) and its
  ``items["root.tar.xz"]`` (monitor:127 / :158, no such item: skipped); SIZE = IMAGE_SIZE_MB,
  FORMAT, SOURCE ``lxd://<ENDPOINT><path>?size=..&filesystem=..&format=..``, REGTIME from the
  serial, IMPORT_ID and ORIGIN_ID ``-1``, TYPE ``IMAGE``, LINK ``<ENDPOINT><path>``
  (one-6.10 monitor:134-149, :178-181); APPTEMPLATE64 ``DRIVER="raw"`` whatever FORMAT
  (one-6.10 monitor:155, one-7.0 monitor:188); VMTEMPLATE64 CPU, VCPU, MEMORY,
  ``LXC_UNPRIVILEGED="false"``, GRAPHICS and CONTEXT (one-6.10 lxd.rb:27-40);
* 6.10 LTS: amd64 only, NAME ``<distro>_<release> - LXC`` (one-6.10 monitor:120, :135); tested
  list with ``alt``, without ``opensuse`` (one-6.10 monitor:52-53, opensuse removed by
  e34cc7008f in 2024-07); no ARCHITECTURE/HYPERVISOR;
  ``SCHED_REQUIREMENTS = "HYPERVISOR=\\"lx*\\""`` (one-6.10 lxd.rb:27); the
  template ends with a stray ``"`` after CONTEXT (lxd.rb:40) that carries no attribute and is
  not reproduced;
* 7.0 and later: arm64 too (one-7.0 monitor:140, 4bf7a016db, 2025-04); NAME
  ``<distro>_<release>`` and ``<distro>_<release> (aarch64)`` (monitor:143-150, 63c38d7fb0,
  2025-05); ARCHITECTURE ``x86_64``/``aarch64`` and HYPERVISOR ``lxc`` (monitor:180-181,
  a7105d21ca and 63c38d7fb0); tested list with ``opensuse`` (2833b134aa), without ``alt``
  (3b419f9cc0, 2025-06) (monitor:71-72); VM template ``SCHED_REQUIREMENTS =
  "HYPERVISOR=lxc & ARCH=<arch>"`` and ``HYPERVISOR = "lxc"`` (one-7.0 lxd.rb:26, :44,
  a7105d21ca), ``RAW = [TYPE="lxc", DATA="lxc.apparmor.profile=unconfined"]`` (lxd.rb:40-43,
  monitor:78, 2833b134aa).

Deliberate differences (none touches NAME, SOURCE, IMPORT_ID, TYPE, FORMAT, ARCHITECTURE,
HYPERVISOR or SIZE, nor a stock attribute of the nested templates under the default options):

* MD5: the md5 of a kind tag, the item's sha256 and the options that shape the image, one per
  line (container: ``lxc-rootfs``, sha256 of ``root.tar.xz``, IMAGE_SIZE_MB, FILESYSTEM,
  FORMAT; KVM image: ``kvm-qcow2``, its sha256). Stock hashes Ruby's ``inspect`` of its
  option hash and the serial (monitor:193 / :226), which depends on the Ruby version. oned only
  compares MD5 to decide whether to rewrite an app (and hands it to images as FROM_APP_MD5), so
  the first monitor after a switch rewrites each app once, under the same id;
* VERSION is the build serial (stock ``1.0``) and DESCRIPTION names the distribution, variant,
  architecture and build (stock ``Downloaded from <ENDPOINT>``);
* PRIVILEGED=no gives ``LXC_UNPRIVILEGED="true"`` (stock writes ``"false"`` for any value:
  ``!"no"`` is false in Ruby, lxd.rb:30/31);
* a password in ENDPOINT (``http://user:secret@host/``) stays only in SOURCE, where the
  download needs it; PUBLISHER, LINK and DESCRIPTION name the endpoint without its user part;
* 6.10 apps also carry ARCHITECTURE and HYPERVISOR, and apps of other architectures (opt-in)
  add ``& ARCH="<arch>"`` to the 6.10 scheduling requirement;
* a product that stock would crash on (bad serial, items not an object) is skipped with a WARN
  instead of failing the whole monitor; an ENDPOINT without a trailing ``/`` gets one (stock
  would glue the path to the host name).

Hostile catalogs: memory and time are bounded before and after parsing. An answer over
:data:`MAX_CATALOG_BYTES`, or that may hold more than :data:`MAX_JSON_VALUES` JSON values
(counted before ``json.loads`` builds anything, ``web.loads_bounded``), fails the monitor in one
line; bytes that are not UTF-8 become U+FFFD, so they cost at most the entry holding them.
Products, builds per product and items per build beyond named caps (:data:`MAX_PRODUCTS`,
:data:`MAX_VERSIONS`, :data:`MAX_ITEMS`) are skipped without being parsed, and every skip is
counted: at most :data:`MAX_WARNINGS` WARN lines, then one summary. KVM images need one ranged
request each at most once (cached by sha256), at most ``qcow2.MAX_REQUESTS_PER_RUN`` a monitor.
Text from the catalog reaches a log line only through :func:`shown` (one line, control
characters escaped).

The catalog is fetched with a conditional GET (an unchanged catalog costs a 304); a failed
fetch is one ``RemoteError`` line.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .. import driverlog
from ..action import Market
from ..backends.attributes import Attr, positive, read, yes_no
from ..backends.base import AppEntry, Backend, MonitorResult
from ..errors import ConfigError, RemoteError, one_line
from ..installation import DEFAULT_ONE_VERSION, ReleaseLine
from ..location import url_parts
from ..template import write_template
from ..units import size_mb
from ..web import CachedFetcher, fetch_json, make_session, public_url
from .qcow2 import MAX_REQUESTS_PER_RUN, VirtualSizeCache, virtual_sizes

DRIVER = "linuxcontainers"
DEFAULT_ENDPOINT = "https://images.linuxcontainers.org/"
CATALOG_PATH = "streams/v1/images.json"

DEFAULT_IMAGE_SIZE_MB = 2048
MAX_IMAGE_SIZE_MB = 16 * 1024 * 1024
"""Largest IMAGE_SIZE_MB accepted (16 TiB): a larger value is a typo."""
DEFAULT_FILESYSTEM = "ext4"
DEFAULT_FORMAT = "raw"
CONTAINER_FORMATS = ("raw", "qcow2")
CONTAINER_DRIVER = "raw"
"""APPTEMPLATE64 DRIVER of container apps: stock writes ``raw`` whatever FORMAT (the LXC driver
picks its disk mapper from the image FORMAT, not from DRIVER)."""
DEFAULT_MEMORY_MB = "768"
DEFAULT_CPU = "1"
DEFAULT_VCPU = "2"
DEFAULT_VARIANTS = ("default",)
DEFAULT_VM_VARIANTS = ("cloud",)
LXC_RAW_DATA = "lxc.apparmor.profile=unconfined"
"""7.x stock RAW section data: without it containers may not start on AppArmor hosts."""

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

CONTAINER_ITEM = "root.tar.xz"
"""Item key of the container rootfs (the only key stock reads)."""
VM_ITEM = "disk.qcow2"
VM_FTYPE = "disk-kvm.img"
_SERIAL_RE = re.compile(r"(\d{4})(\d{2})(\d{2})_(\d{2}):?(\d{2})")
"""Build serials: linuxcontainers.org writes ``20240110_07:42`` (stock parses it with
``%Y%m%d_%H:%M``), Canonical's server ``20240110_0742``."""

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

MAX_CATALOG_BYTES = 16 * 1024 * 1024
"""Largest images.json accepted (16 MiB; the 2025 matrix with every architecture of 2023 is
1.8 MB): it is held in memory as bytes, as text (up to 4 bytes a character) and parsed."""
MAX_JSON_VALUES = 1_000_000
"""JSON values accepted in images.json, bounded before parsing (the full 2025 matrix has
about 85,000); at CPython's ~70 bytes per value the parsed document stays under ~70 MB."""
MAX_PRODUCTS = 20_000
"""Products examined in one catalog (the real server has about a thousand); the rest are
counted as skipped without being looked at."""
MAX_VERSIONS = 32
"""Builds of one product (the real server keeps 3): a product with more is skipped."""
MAX_ITEMS = 64
"""Items of one build (the real server has at most 7) searched for a VM disk."""
MAX_WARNINGS = 20
"""WARN lines for skipped products in one monitor; the rest are counted in one last line."""
MAX_SHOWN_CHARS = 120
"""Catalog text quoted in a log line is cut to this many characters."""
MAX_NAME_PART_CHARS = 64
_SAFE_PATH_RE = re.compile(r"[A-Za-z0-9._~:@+,=/-]+")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_FS_RE = re.compile(r"[A-Za-z0-9]{1,16}")


class ProductError(ValueError):
    """One catalog product is malformed: it is skipped with a WARN line."""


# --------------------------------------------------------------------------------------------
# What the stock driver of each release line publishes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StockRules:
    """The stock monitor's rules of one release line (see the module docstring)."""

    line: str
    tested_distributions: tuple[str, ...]
    """Distributions published when SKIP_UNTESTED=yes (the stock downloader contextualizes them)."""
    architectures: tuple[str, ...]
    """Architectures published by default (ARCHITECTURES widens the set)."""
    name_suffix: str
    """After ``<distro>_<release>``: `` - LXC`` in 6.10, nothing in 7.x."""
    templates_7x: bool
    """7.x VM templates, whose rules came together: ``HYPERVISOR=lxc & ARCH=<arch>`` (6.10:
    ``HYPERVISOR="lx*"``), and at the end the RAW apparmor section and ``HYPERVISOR``."""

    def container_name(self, base: str, arch: str) -> str:
        return f"{base}{self.name_suffix}{arch_suffix(arch)}"

    def sched_requirements(self, arch: str) -> str:
        if self.templates_7x:
            return f"HYPERVISOR=lxc & ARCH={arch}"
        if arch == "x86_64":
            return 'HYPERVISOR="lx*"'
        return f'HYPERVISOR="lx*" & ARCH="{arch}"'


STOCK_6_10 = StockRules(
    line="6.10",
    tested_distributions=(
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
    ),
    architectures=("x86_64",),
    name_suffix=" - LXC",
    templates_7x=False,
)
STOCK_7X = StockRules(
    line="7.x",
    tested_distributions=(
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
    ),
    architectures=("x86_64", "aarch64"),
    name_suffix="",
    templates_7x=True,
)


def stock_rules(line: ReleaseLine) -> StockRules:
    return STOCK_7X if line.is_7x else STOCK_6_10


def arch_suffix(arch: str) -> str:
    return "" if arch == "x86_64" else f" ({arch})"


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


def _endpoint(text: str) -> str:
    driverlog.redact_url(text)
    if not re.fullmatch(r"https?://[^\s?#]+", text):
        raise ValueError(
            f"{one_line(text, 80)!r} is invalid: expected an http(s) URL without query"
        )
    url_parts(text)
    return text if text.endswith("/") else text + "/"


def _image_size(text: str) -> int:
    size = int(positive(int)(text))
    if size > MAX_IMAGE_SIZE_MB:
        raise ValueError(f"{text!r} is invalid: at most {MAX_IMAGE_SIZE_MB}")
    return size


def _filesystem(text: str) -> str:
    if not _FS_RE.fullmatch(text):
        raise ValueError(
            f"{one_line(text, 80)!r} is invalid: expected a file system name such as ext4"
        )
    return text  # stock copies FILESYSTEM and FORMAT into SOURCE and FORMAT as written


def _format(text: str) -> str:
    if text.lower() not in CONTAINER_FORMATS:
        raise ValueError(f"{one_line(text, 80)!r} is invalid: expected raw or qcow2")
    return text


def _words(text: str) -> tuple[str, ...]:
    items = tuple(w.lower() for w in _split_list(text))
    for w in items:
        if not _WORD_RE.fullmatch(w):
            raise ValueError(f"{one_line(text, 80)!r} is invalid: {w!r} is not a valid name")
    return items


ATTRIBUTES = (
    Attr("ENDPOINT", "simplestreams server", DEFAULT_ENDPOINT, parse=_endpoint),
    Attr("IMAGE_SIZE_MB", "container disk size, also the app's SIZE",
         str(DEFAULT_IMAGE_SIZE_MB), parse=_image_size),
    Attr("FILESYSTEM", "file system of the container disk", DEFAULT_FILESYSTEM,
         parse=_filesystem),
    Attr("FORMAT", "raw or qcow2 container disk", DEFAULT_FORMAT, parse=_format),
    Attr("SKIP_UNTESTED", "only the distributions stock tests (exactly yes)", "yes"),
    Attr("MEMORY", "MEMORY of the LXC VM template", DEFAULT_MEMORY_MB, parse=positive(int)),
    Attr("CPU", "CPU of the LXC VM template", DEFAULT_CPU, parse=positive(float)),
    Attr("VCPU", "VCPU of the LXC VM template", DEFAULT_VCPU, parse=positive(int)),
    Attr("PRIVILEGED", "LXC_UNPRIVILEGED is its opposite", "true", parse=yes_no),
    Attr("VARIANTS", "container variants", ",".join(DEFAULT_VARIANTS), parse=_words),
    Attr("ARCHITECTURES", "OpenNebula names (default: the release's)", parse=_split_list),
    Attr("DISTRIBUTIONS", "explicit list (default: the tested ones)", parse=_words),
    Attr("VM_IMAGES", "also publish KVM qcow2 apps", "no", parse=yes_no),
    Attr("VM_VARIANTS", "variants published as KVM images", ",".join(DEFAULT_VM_VARIANTS),
         parse=_words),
)  # fmt: skip


@dataclass(frozen=True)
class LxcOptions:
    """Market attributes of a ``linuxcontainers`` marketplace, validated."""

    endpoint: str = DEFAULT_ENDPOINT
    """As configured (with a trailing ``/``): what SOURCE and the catalog fetch use."""
    image_size_mb: int = DEFAULT_IMAGE_SIZE_MB
    filesystem: str = DEFAULT_FILESYSTEM
    format: str = DEFAULT_FORMAT
    skip_untested: bool = True
    memory: str = DEFAULT_MEMORY_MB
    cpu: str = DEFAULT_CPU
    vcpu: str = DEFAULT_VCPU
    privileged: bool = True
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    architectures: tuple[str, ...] = STOCK_7X.architectures
    distributions: tuple[str, ...] = ()
    vm_images: bool = False
    vm_variants: tuple[str, ...] = DEFAULT_VM_VARIANTS
    rules: StockRules = STOCK_7X

    @property
    def catalog_url(self) -> str:
        return self.endpoint + CATALOG_PATH

    @property
    def public_endpoint(self) -> str:
        """ENDPOINT without credentials, for PUBLISHER, LINK and DESCRIPTION."""
        return public_url(self.endpoint)

    def distribution_allowed(self, distro: str) -> bool:
        if self.distributions:
            return distro in self.distributions
        return not self.skip_untested or distro in self.rules.tested_distributions

    @classmethod
    def from_market(cls, market: Market, line: ReleaseLine | None = None) -> LxcOptions:
        """Options of ``market`` under the stock rules of ``line`` (default: 7.x)."""
        rules = stock_rules(line or ReleaseLine.of(DEFAULT_ONE_VERSION))
        v = read(market, ATTRIBUTES)
        # stock skips untested distributions only when SKIP_UNTESTED is absent or exactly
        # "yes" (one-7.0 monitor:141): "no", "YES", "" and anything else publish them all
        skip_value = market.attrs.get("SKIP_UNTESTED")
        skip_untested = skip_value is None or skip_value.strip() == "yes"
        architectures: list[str] = []
        for arch in v["ARCHITECTURES"] or rules.architectures:
            one_arch = SIMPLESTREAMS_TO_ONE_ARCH.get(arch, arch)
            if one_arch not in ONE_TO_SIMPLESTREAMS_ARCH:
                known = ", ".join(ONE_TO_SIMPLESTREAMS_ARCH)
                raise ConfigError(
                    f"marketplace '{market.name}': ARCHITECTURES {arch!r} is not one of {known}"
                )
            if one_arch not in architectures:
                architectures.append(one_arch)

        return cls(
            endpoint=v["ENDPOINT"],
            image_size_mb=v["IMAGE_SIZE_MB"],
            filesystem=v["FILESYSTEM"],
            format=v["FORMAT"],
            skip_untested=skip_untested,
            memory=v["MEMORY"],
            cpu=v["CPU"],
            vcpu=v["VCPU"],
            privileged=v["PRIVILEGED"],
            variants=v["VARIANTS"] or DEFAULT_VARIANTS,
            architectures=tuple(architectures or rules.architectures),
            distributions=v["DISTRIBUTIONS"] or (),
            vm_images=v["VM_IMAGES"],
            vm_variants=v["VM_VARIANTS"] or DEFAULT_VM_VARIANTS,
            rules=rules,
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

    key: str  # the product's key in the catalog (``distro:release:arch:variant``)
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


def _serial_order(serial: object) -> str:
    """``YYYYMMDD_HHMM`` of a build serial (sorts as the builds' dates); ProductError when it is
    not one (a regular expression, not ``strptime``: a catalog may hold a million serials)."""
    if not isinstance(serial, str) or _SERIAL_RE.fullmatch(serial) is None:
        raise ProductError(f"bad build serial {one_line(str(serial), 40)!r}")
    return serial.replace(":", "")


def parse_serial(serial: object) -> int:
    """Epoch (UTC) of a build serial; ProductError when it is not one."""
    m = _SERIAL_RE.fullmatch(serial) if isinstance(serial, str) else None
    try:
        if m is None:
            raise ValueError
        when = dt.datetime(*map(int, m.groups()), tzinfo=dt.UTC)  # type: ignore[misc]
    except ValueError:
        raise ProductError(f"bad build serial {one_line(str(serial), 40)!r}") from None
    return int(when.timestamp())


def _item(name: str, raw: object) -> Item:
    what = f"item {one_line(name, MAX_SHOWN_CHARS)!r}"
    if not isinstance(raw, dict):
        raise ProductError(f"{what} is not an object")
    path, sha, size = raw.get("path"), raw.get("sha256"), raw.get("size")
    if not isinstance(path, str) or len(path) > 1024 or not _SAFE_PATH_RE.fullmatch(path):
        raise ProductError(f"{what} has no usable path")
    if path.startswith("/") or ".." in path.split("/"):
        raise ProductError(f"{what} path leaves the server root")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha.lower()):
        raise ProductError(f"{what} has no valid sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ProductError(f"{what} has no valid size")
    ftype = raw.get("ftype", "")
    return Item(
        ftype=ftype if isinstance(ftype, str) else "", path=path, sha256=sha.lower(), size=size
    )


def _find_disk(items: Mapping[str, object]) -> Item | None:
    """The qcow2 disk of a build: by its usual key, else by ftype among the first items."""
    if VM_ITEM in items:
        return _item(VM_ITEM, items[VM_ITEM])
    for index, (name, raw) in enumerate(items.items()):
        if index >= MAX_ITEMS:
            break
        if isinstance(raw, dict) and raw.get("ftype") == VM_FTYPE:
            return _item(str(name), raw)
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
    if len(versions) > MAX_VERSIONS:
        raise ProductError(f"product has {len(versions)} builds (at most {MAX_VERSIONS})")
    # the server inserts builds oldest first; take the newest by date, whatever the order
    _order, serial = max((_serial_order(serial), serial) for serial in versions)
    regtime = parse_serial(serial)
    version = versions[serial]
    items = version.get("items") if isinstance(version, dict) else None
    if not isinstance(items, dict):
        raise ProductError(f"build {one_line(str(serial), MAX_SHOWN_CHARS)!r} has no items")
    requirements = product.get("requirements", product.get("lxd_requirements", {}))
    if requirements is None:
        requirements = {}
    if not isinstance(requirements, dict):
        raise ProductError("requirements is not an object")
    os_name = product.get("os", distro.title())
    if not isinstance(os_name, str):
        raise ProductError("os is not a string")
    rootfs = None
    if want_rootfs and CONTAINER_ITEM in items:
        rootfs = _item(CONTAINER_ITEM, items[CONTAINER_ITEM])
    return Build(
        key=key,
        distro=distro,
        release=release,
        arch=SIMPLESTREAMS_TO_ONE_ARCH.get(ss_arch, ss_arch),
        variant=variant,
        os_name=os_name,
        serial=serial,
        regtime=regtime,
        requirements={
            str(k): str(v) for k, v in list(requirements.items())[:MAX_ITEMS] if isinstance(v, str)
        },
        rootfs=rootfs,
        disk=_find_disk(items) if want_disk else None,
    )


@dataclass
class Skipped:
    """Products skipped in one monitor: the first few get a WARN line, the rest a count."""

    count: int = 0
    unread: int = 0
    """Products past :data:`MAX_PRODUCTS`, not looked at."""
    reasons: list[str] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < MAX_WARNINGS:
            self.reasons.append(
                f"{DRIVER}: skipping product {one_line(key, MAX_SHOWN_CHARS)!r}: {reason}"
            )

    def warn(self) -> None:
        for line in self.reasons:
            driverlog.warn(line)
        more = self.count - len(self.reasons)
        if more > 0:
            driverlog.warn(f"{DRIVER}: {more} more broken products skipped")
        if self.unread:
            driverlog.warn(
                f"{DRIVER}: {self.unread} products past the first {MAX_PRODUCTS} not read"
            )


def select_builds(catalog: object, opts: LxcOptions, url: str) -> list[Build]:
    """Newest build of every product the options ask for, in catalog order."""
    products = catalog.get("products") if isinstance(catalog, dict) else None
    if not isinstance(products, dict):
        raise RemoteError(f"{url} is not a simplestreams catalog (no products object)")
    wanted_arches = {ONE_TO_SIMPLESTREAMS_ARCH[a] for a in opts.architectures}
    builds: list[Build] = []
    skipped = Skipped()
    for index, (key, product) in enumerate(products.items()):
        if index >= MAX_PRODUCTS:
            skipped.unread = len(products) - MAX_PRODUCTS
            break
        parts = key.split(":")
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
            build = newest_build(key, product, want_ct, want_vm)
        except ProductError as exc:
            skipped.add(key, str(exc))
            continue
        if build.rootfs is None and build.disk is None:
            continue  # nothing of the wanted kind in the newest build (a VM-only product)
        builds.append(build)
    skipped.warn()
    return builds


# --------------------------------------------------------------------------------------------
# Apps
# --------------------------------------------------------------------------------------------


def vm_disks(opts: LxcOptions, builds: list[Build]) -> dict[str, str]:
    """sha256 -> URL of the qcow2 disks VM apps are made of: the headers whose virtual size
    the monitor (and a mirror, to publish the same apps) has to read."""
    return {
        b.disk.sha256: opts.endpoint + b.disk.path
        for b in builds
        if b.disk is not None and b.variant in opts.vm_variants
    }


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


def container_name(build: Build, rules: StockRules = STOCK_7X) -> str:
    """The stock name of the release line; other variants and arches get a suffix."""
    return rules.container_name(_name_base(build), build.arch)


def vm_name(build: Build) -> str:
    """``<distro>_<release>_<variant> - KVM``: never equal to a container name."""
    return f"{_name_base(build)} - KVM{arch_suffix(build.arch)}"


def lxc_vm_template(opts: LxcOptions, build: Build) -> str:
    """The stock driver's LXC template of the release line."""
    rules = opts.rules
    attrs: list[tuple[str, object]] = [
        ("SCHED_REQUIREMENTS", rules.sched_requirements(build.arch)),
        ("CPU", opts.cpu),
        ("VCPU", opts.vcpu),
        ("MEMORY", opts.memory),
        ("LXC_UNPRIVILEGED", "false" if opts.privileged else "true"),
        ("GRAPHICS", GRAPHICS),
        ("CONTEXT", CONTEXT),
    ]
    if rules.templates_7x:
        attrs += [("RAW", {"TYPE": "lxc", "DATA": LXC_RAW_DATA}), ("HYPERVISOR", "lxc")]
    return write_template(attrs)


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
    attrs: list[tuple[str, object]] = [
        ("SCHED_REQUIREMENTS", f'HYPERVISOR="kvm" & ARCH="{build.arch}"'),
        ("CPU", opts.cpu),
        ("VCPU", opts.vcpu),
        ("MEMORY", opts.memory),
        ("OS", kvm_os_section(build)),
        ("NIC_DEFAULT", {"MODEL": "virtio"}),
        ("GRAPHICS", GRAPHICS),
        ("CONTEXT", CONTEXT),
    ]
    if opts.rules.templates_7x:
        attrs.append(("HYPERVISOR", "kvm"))
    return write_template(attrs)


def _build_fields(opts: LxcOptions, build: Build, path: str, kind: str) -> dict[str, object]:
    """AppEntry fields every app of one build shares, container or KVM image."""
    public = opts.public_endpoint
    return {
        "import_id": "-1",
        "publisher": public,
        "description": (
            f"{build.os_name} {build.release} {build.variant} {kind} for {build.arch} "
            f"(build {build.serial}), downloaded from {public}"
        ),
        "version": build.serial,
        "regtime": build.regtime,
        "link": public + path,
        "architecture": build.arch,
    }


def container_app(opts: LxcOptions, build: Build) -> AppEntry:
    item = build.rootfs
    assert item is not None
    query = f"size={opts.image_size_mb}&filesystem={opts.filesystem}&format={opts.format}"
    return AppEntry(
        name=container_name(build, opts.rules),
        source=f"lxd://{opts.endpoint}{item.path}?{query}",
        format=opts.format,
        size_mb=opts.image_size_mb,
        md5=derived_md5(
            "lxc-rootfs", item.sha256, opts.image_size_mb, opts.filesystem, opts.format
        ),
        hypervisor="lxc",
        apptemplate64=_b64(write_template([("DRIVER", CONTAINER_DRIVER)])),
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
        size_mb=max(1, size_mb(virtual_size)),
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
    collisions = 0
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
                collisions += 1
                if collisions <= MAX_WARNINGS:
                    name = one_line(app.name, MAX_SHOWN_CHARS)
                    driverlog.warn(
                        f"{DRIVER}: two products give the app name {name!r}; keeping the first"
                    )
                continue
            seen.add(app.name)
            apps.append(app)
    if collisions > MAX_WARNINGS:
        driverlog.warn(f"{DRIVER}: {collisions - MAX_WARNINGS} more duplicate app names skipped")
    return apps


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


class LinuxContainersCatalog(Backend):
    """Public catalog of images.linuxcontainers.org: monitor only."""

    driver = DRIVER
    attributes = ATTRIBUTES

    def user_agent(self) -> str:
        return f"OpenNebula {self.context.installation.one_version()} (Market Driver)"

    def monitor(self) -> MonitorResult:
        result, _stats = self.monitor_with_stats()
        return result

    def monitor_with_stats(self) -> tuple[MonitorResult, CatalogStats]:
        installation = self.context.installation
        opts = LxcOptions.from_market(self.market, installation.release_line())
        cache_dir = installation.cache_dir
        session = make_session(self.user_agent())
        stats = CatalogStats()
        try:
            try:
                catalog, stats.from_cache = fetch_json(
                    CachedFetcher(session, cache_dir, max_body_bytes=MAX_CATALOG_BYTES),
                    opts.catalog_url,
                    max_values=MAX_JSON_VALUES,
                )
            except RemoteError as exc:
                # the one line of a failed fetch, after the retries, naming the marketplace
                raise RemoteError(f"marketplace '{self.market.name}': {exc}") from None
            builds = select_builds(catalog, opts, opts.catalog_url)
            del catalog  # the parsed document is the largest thing a monitor holds
            stats.products = len(builds)
            sizes: dict[str, int] = {}
            if opts.vm_images:
                wanted = vm_disks(opts, builds)
                lookup = virtual_sizes(session, wanted, VirtualSizeCache.in_dir(cache_dir))
                stats.ranged_requests = lookup.requests
                for error in list(lookup.failures.values())[:MAX_WARNINGS]:
                    driverlog.warn(f"{DRIVER}: skipping a KVM image: {one_line(error, 400)}")
                if lookup.not_tried:
                    driverlog.warn(
                        f"{DRIVER}: {lookup.not_tried} more KVM images skipped "
                        "after repeated failures to read their qcow2 header"
                    )
                if lookup.deferred:
                    driverlog.warn(
                        f"{DRIVER}: {lookup.deferred} KVM images left for the next monitor "
                        f"(at most {MAX_REQUESTS_PER_RUN} qcow2 headers are read per monitor)"
                    )
                sizes = lookup.sizes
        finally:
            session.close()
        apps = build_apps(opts, builds, sizes)
        stats.containers = sum(1 for a in apps if a.hypervisor == "lxc")
        stats.vm_images = sum(1 for a in apps if a.hypervisor == "kvm")
        driverlog.debug(
            f"{DRIVER}: {stats.containers} container and {stats.vm_images} KVM apps "
            f"({opts.rules.line} rules) from {opts.catalog_url}"
            f"{' (unchanged)' if stats.from_cache else ''}"
        )
        return MonitorResult(used_mb=0, free_mb=0, total_mb=0, apps=apps), stats
