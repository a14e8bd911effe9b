"""The ``one`` driver: appliances of an OpenNebula appliance catalog (appmarket-simple).

Serves the official marketplace (marketplace.opennebula.io, the default) and the Community
Marketplace (community-marketplace.opennebula.io) alike: ``GET <ENDPOINT>/appliance`` answers
``{"appliances": [...]}``, picking the list for the OpenNebula version named at the start of the
``User-Agent``. Each appliance becomes one ``APP`` with the same NAME, SOURCE and IMPORT_ID as
upstream's Ruby monitor, so that switching drivers keeps the apps oned already has.

Monitor only: the catalog is public and read-only, so import and delete are refused by the
base class. One broken appliance is skipped with a ``WARN:`` line; a catalog that cannot be read
fails the whole monitor with one line (oned keeps its apps until a monitor succeeds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import driverlog
from ..backends.base import AppEntry, Backend, MonitorResult
from ..errors import ConfigError, MarketError, RemoteError, one_line
from ..template import write_template
from ..web import CachedFetcher, fetch_json, make_session
from .vmtemplate import convert

DEFAULT_ENDPOINT = "https://marketplace.opennebula.io/"
AGENT = "Market Driver"
MB_BYTES = 2**20

TYPE_IMAGE = "IMAGE"
TYPE_VMTEMPLATE = "VMTEMPLATE"
TYPE_SERVICE_TEMPLATE = "SERVICE_TEMPLATE"
APP_TYPES = (TYPE_IMAGE, TYPE_VMTEMPLATE, TYPE_SERVICE_TEMPLATE)

ARCH_ALL = "all"
ARCH_ALIASES = {"": ARCH_ALL, "amd64": "x86_64", "arm64": "aarch64"}
"""Catalog ``os-arch`` -> OpenNebula host ARCH, as upstream; other names pass through."""
HYPERVISOR_DEFAULT = "kvm"
HYPERVISOR_ALIASES = {"": HYPERVISOR_DEFAULT, "all": HYPERVISOR_DEFAULT}
"""Catalog ``hypervisor`` (lower-cased) -> HYPERVISOR; ``ALL`` and empty mean kvm, as upstream."""
AARCH64_OS = {
    "ARCH": "aarch64",
    "FIRMWARE": "/usr/share/AAVMF/AAVMF_CODE.fd",
    "FIRMWARE_SECURE": "no",
    "MACHINE": "virt",
}
"""OS section upstream sets on the VM template of aarch64 appliances (UEFI, virt machine)."""

DISK_NAME_HEX_CHARS = 10
"""Length of the DISK NAME of VMTEMPLATE apps (upstream: 10 random hex characters; ours are
derived from the appliance so that the output is the same on every monitor)."""
LABEL_CHARS = 80
"""Longest appliance name quoted in a WARN line."""
MAX_SKIP_WARNINGS = 50
"""WARN lines about skipped appliances per monitor; the rest are only counted (oned logs every
line of every monitor, every 10 minutes by default)."""

FILTER_ARCHITECTURES = "ARCHITECTURES"
FILTER_HYPERVISORS = "HYPERVISORS"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_EDITION_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
_SPLIT_RE = re.compile(r"[\s,]+")


class BadAppliance(MarketError):
    """One catalog entry cannot be published (the message says why); the others still are."""


def normalize_arch(value: str) -> str:
    low = value.strip().lower()
    return ARCH_ALIASES.get(low, low)


def normalize_hypervisor(value: str) -> str:
    low = value.strip().lower()
    return HYPERVISOR_ALIASES.get(low, low)


@dataclass(frozen=True)
class CatalogFilter:
    """Which appliances to publish; ``None`` means no restriction (the default, as upstream)."""

    architectures: frozenset[str] | None = None
    hypervisors: frozenset[str] | None = None

    @classmethod
    def from_attrs(cls, arches: str | None, hypervisors: str | None) -> CatalogFilter:
        return cls(
            _word_set(arches, normalize_arch, FILTER_ARCHITECTURES),
            _word_set(hypervisors, normalize_hypervisor, FILTER_HYPERVISORS),
        )

    def admits(self, app: AppEntry) -> bool:
        arches = self.architectures
        if arches is not None and app.architecture not in arches | {ARCH_ALL}:
            return False
        return self.hypervisors is None or app.hypervisor in self.hypervisors

    @property
    def active(self) -> bool:
        return self.architectures is not None or self.hypervisors is not None


def _word_set(
    text: str | None, normalize: Callable[[str], str], attr: str
) -> frozenset[str] | None:
    if text is None or not text.strip():
        return None
    words = frozenset(normalize(w) for w in _SPLIT_RE.split(text.strip()) if w)
    bad = sorted(w for w in words if not _WORD_RE.fullmatch(w))
    if bad:
        raise ConfigError(f"{attr} has invalid entries: {', '.join(bad)[:200]}")
    return words


# --------------------------------------------------------------------------- field readers


def _text(raw: Mapping[str, object], key: str, where: str = "") -> str:
    """An optional text field: strings and numbers are accepted, anything else is an error."""
    value = raw.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadAppliance(f"{where}{key} is a {type(value).__name__}, not text")


def _number(raw: Mapping[str, object], key: str, where: str = "") -> int | None:
    """An optional non-negative number (JSON number or decimal string), rounded down."""
    value = raw.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadAppliance(f"{where}{key} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAppliance(f"{where}{key} is a {type(value).__name__}, not a number")
    if not math.isfinite(value) or value < 0:
        raise BadAppliance(f"{where}{key} is not a non-negative number")
    return int(value)


def _appliance_id(raw: Mapping[str, object]) -> str:
    oid = raw.get("_id")
    value = oid.get("$oid") if isinstance(oid, Mapping) else None
    if not isinstance(value, str):
        raise BadAppliance("no _id.$oid")
    if not _ID_RE.fullmatch(value):
        raise BadAppliance("_id.$oid is not a plain identifier")
    return value


def _vm_template_doc(raw: Mapping[str, object]) -> dict | None:
    """The appliance's ``opennebula_template`` as a JSON object (``None`` when it has none)."""
    value = raw.get("opennebula_template")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadAppliance("opennebula_template is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadAppliance("opennebula_template is not a JSON object")
    return value


def _key(doc: Mapping[str, object], name: str) -> str | None:
    """The member of ``doc`` that becomes attribute ``name`` (names are case-insensitive)."""
    for key in doc:
        if str(key).upper() == name:
            return key
    return None


def place(doc: Mapping[str, object], arch: str, hypervisor: str) -> dict:
    """The VM template with the placement upstream adds: hypervisor and architecture in
    SCHED_REQUIREMENTS (after the appliance's own, if any), and the aarch64 OS section."""
    out = dict(doc)
    clauses = [f'HYPERVISOR="{hypervisor}"']
    if arch != ARCH_ALL:
        clauses.append(f'ARCH="{arch}"')
    key = _key(out, "SCHED_REQUIREMENTS") or "SCHED_REQUIREMENTS"
    own = out.get(key)
    if isinstance(own, str) and own.strip():
        clauses.insert(0, f"({own.strip()})")
    out[key] = " & ".join(clauses)
    if arch == "aarch64":
        key = _key(out, "OS") or "OS"
        section = out.get(key)
        kept = {}
        if isinstance(section, Mapping):
            kept = {k: v for k, v in section.items() if str(k).upper() not in AARCH64_OS}
        out[key] = {**kept, **AARCH64_OS}
    return out


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _vm_template64(doc: Mapping[str, object], arch: str, hypervisor: str, label: str) -> str:
    converted = convert(place(doc, arch, hypervisor))
    if converted.dropped:
        driverlog.warn(
            f"{label}: VM template members left out (not representable in a template): "
            + ", ".join(converted.dropped)[:300]
        )
    return _b64(converted.text)


# --------------------------------------------------------------------------- one appliance


def appliance_to_app(raw: object, base_url: str, label: str = "appliance") -> AppEntry:
    """One catalog appliance as an APP (upstream's mapping); BadAppliance if it cannot be."""
    if not isinstance(raw, Mapping):
        raise BadAppliance(f"is a {type(raw).__name__}, not an object")
    app_id = _appliance_id(raw)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadAppliance("no name")
    app_type = raw.get("type") or TYPE_IMAGE
    if app_type not in APP_TYPES:
        raise BadAppliance(f"unknown type {str(app_type)[:40]!r}")

    arch = normalize_arch(_text(raw, "os-arch"))
    hypervisor = normalize_hypervisor(_text(raw, "hypervisor"))
    if not _WORD_RE.fullmatch(arch):
        raise BadAppliance("os-arch is not a plain architecture name")
    if not _WORD_RE.fullmatch(hypervisor):
        raise BadAppliance("hypervisor is not a plain hypervisor name")

    tags = raw.get("tags")
    if tags is None:
        tags_text = ""
    elif isinstance(tags, list) and all(isinstance(t, str | int | float) for t in tags):
        tags_text = ", ".join(str(t) for t in tags)
    else:
        raise BadAppliance("tags is not a list of words")

    link = f"{base_url}/appliance/{app_id}"
    app = AppEntry(
        name=name,
        source=f"{link}/download/0",
        import_id=app_id,
        type=app_type,
        publisher=_text(raw, "publisher"),
        format=_text(raw, "format"),
        description=_text(raw, "short_description"),
        version=_text(raw, "version"),
        tags=tags_text,
        regtime=_number(raw, "creation_time"),
        link=link,
        architecture=arch,
        hypervisor=hypervisor,
    )
    doc = _vm_template_doc(raw)
    if app_type == TYPE_IMAGE:
        _fill_image(app, raw, doc, label)
    elif app_type == TYPE_VMTEMPLATE:
        _fill_vmtemplate(app, raw, doc, label)
    else:
        _fill_service_template(app, raw, doc)
    return app


def _fill_image(app: AppEntry, raw: Mapping[str, object], doc: dict | None, label: str) -> None:
    files = raw.get("files")
    if not isinstance(files, list) or not files:
        raise BadAppliance("IMAGE appliance without files")
    first = files[0]
    if not isinstance(first, Mapping):
        raise BadAppliance("files[0] is not an object")
    size = _number(first, "size", "files[0].")
    app.size_mb = math.ceil(size / MB_BYTES) if size else 0
    md5 = first.get("md5")
    checksum = first.get("checksum")
    if not md5 and isinstance(checksum, Mapping):
        md5 = checksum.get("md5")
    if md5:
        if not isinstance(md5, str) or not _MD5_RE.fullmatch(md5):
            raise BadAppliance("files[0].md5 is not an MD5 checksum")
        app.md5 = md5.lower()
    image_attrs = [
        ("DEV_PREFIX", _text(first, "dev_prefix", "files[0].")),
        ("DRIVER", _text(first, "driver", "files[0].")),
        ("TYPE", _text(first, "type", "files[0].")),
    ]
    image_attrs = [(n, v) for n, v in image_attrs if v]
    if image_attrs:
        app.apptemplate64 = _b64(write_template(image_attrs))
    if doc is not None:
        app.vmtemplate64 = _vm_template64(doc, app.architecture, app.hypervisor, label)


def _fill_vmtemplate(
    app: AppEntry, raw: Mapping[str, object], doc: dict | None, label: str
) -> None:
    app.size_mb = 0
    disks = raw.get("disks") or []
    if not isinstance(disks, list) or not all(isinstance(d, str) and d for d in disks):
        raise BadAppliance("disks is not a list of appliance names")
    for index, disk_app in enumerate(disks):
        seed = f"{app.import_id}\n{index}\n{disk_app}".encode()
        disk_name = hashlib.sha256(seed).hexdigest()[:DISK_NAME_HEX_CHARS]
        app.disks.append({"NAME": disk_name, "APP": disk_app})
    if doc is not None:
        app.apptemplate64 = _vm_template64(doc, app.architecture, app.hypervisor, label)


def _fill_service_template(app: AppEntry, raw: Mapping[str, object], doc: dict | None) -> None:
    app.size_mb = 0
    roles = raw.get("roles") or {}
    if not isinstance(roles, Mapping) or not all(
        isinstance(r, str) and r and isinstance(a, str) and a for r, a in roles.items()
    ):
        raise BadAppliance("roles is not an object of role name -> appliance name")
    for role, role_app in roles.items():
        app.roles.append({"NAME": role, "APP": role_app})
    if doc is not None:
        text = raw.get("opennebula_template")
        app.apptemplate64 = _b64(text if isinstance(text, str) else json.dumps(doc))


# --------------------------------------------------------------------------- the driver


def _label(raw: object, index: int) -> str:
    """How a WARN line names an appliance: position, name and id when it has them."""
    label = f"appliance #{index}"
    if isinstance(raw, Mapping):
        name = raw.get("name")
        if isinstance(name, str) and name.strip():
            short = one_line(name, LABEL_CHARS)
            label += f" '{short}'"
        oid = raw.get("_id")
        if isinstance(oid, Mapping) and isinstance(oid.get("$oid"), str):
            label += f" ({one_line(oid['$oid'], LABEL_CHARS)})"
    return label


def appliance_list(doc: object, url: str) -> list[object]:
    """The ``appliances`` array of a catalog answer; RemoteError if the answer has another shape."""
    if not isinstance(doc, Mapping):
        raise RemoteError(f"{url} did not answer an appliance catalog (JSON {type(doc).__name__})")
    apps = doc.get("appliances")
    if not isinstance(apps, list):
        raise RemoteError(f"{url} did not answer an appliance catalog (no 'appliances' list)")
    return apps


def build_apps(
    appliances: Iterable[object], base_url: str, flt: CatalogFilter | None = None
) -> tuple[list[AppEntry], int, int]:
    """APPs for the catalog's appliances, in catalog order; returns (apps, skipped, filtered)."""
    flt = flt or CatalogFilter()
    apps: list[AppEntry] = []
    names: set[str] = set()
    skipped = filtered = 0

    def skip(label: str, why: str) -> None:
        nonlocal skipped
        skipped += 1
        if skipped <= MAX_SKIP_WARNINGS:
            driverlog.warn(f"skipping {label}: {why}")

    for index, raw in enumerate(appliances):
        label = _label(raw, index)
        try:
            app = appliance_to_app(raw, base_url, label)
        except MarketError as exc:
            skip(label, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - one entry must never abort the monitor
            skip(label, f"unexpected {type(exc).__name__}")
            continue
        if not flt.admits(app):
            filtered += 1
            continue
        if app.name in names:
            skip(label, "another appliance already has this name")
            continue
        names.add(app.name)
        apps.append(app)
    if skipped > MAX_SKIP_WARNINGS:
        driverlog.warn(f"{skipped - MAX_SKIP_WARNINGS} more appliances skipped (not listed)")
    return apps, skipped, filtered


def user_agent(version: str, edition: str = "") -> str:
    """``OpenNebula <version> [<edition>] (Market Driver)``: the catalog picks its list by it."""
    if edition:
        return f"OpenNebula {version} {edition} ({AGENT})"
    return f"OpenNebula {version} ({AGENT})"


def base_url_of(endpoint: str) -> str:
    """The endpoint without trailing slashes; ConfigError unless it is an http(s) URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"ENDPOINT must be an http:// or https:// URL, not {endpoint[:100]!r}")
    driverlog.redact_url(endpoint)
    return endpoint.strip().rstrip("/")


class OpenNebulaCatalog(Backend):
    """Monitor of an OpenNebula appliance catalog (official or Community Marketplace)."""

    driver = "one"

    def _edition(self) -> str:
        try:
            path = self.context.installation.remotes / "EDITION"
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""
        return text if _EDITION_RE.fullmatch(text) else ""

    def monitor(self) -> MonitorResult:
        base_url = base_url_of(self.market.attr("ENDPOINT", DEFAULT_ENDPOINT) or DEFAULT_ENDPOINT)
        flt = CatalogFilter.from_attrs(
            self.market.attr(FILTER_ARCHITECTURES), self.market.attr(FILTER_HYPERVISORS)
        )
        installation = self.context.installation
        agent = user_agent(installation.one_version(), self._edition())
        url = f"{base_url}/appliance"
        session = make_session(agent)
        try:
            doc, from_cache = fetch_json(CachedFetcher(session, installation.cache_dir), url)
        finally:
            session.close()
        appliances = appliance_list(doc, url)
        apps, skipped, filtered = build_apps(appliances, base_url, flt)
        driverlog.info(
            f"{len(apps)} of {len(appliances)} appliances published from {url}"
            f"{' (unchanged, cached copy)' if from_cache else ''}"
            f"{f', {skipped} skipped' if skipped else ''}"
            f"{f', {filtered} left out by filters' if filtered else ''}"
        )
        if not apps and appliances:
            driverlog.warn(
                "no appliance published: oned keeps the apps it already lists from this market"
            )
        return MonitorResult(used_mb=0, free_mb=0, total_mb=0, apps=apps)
