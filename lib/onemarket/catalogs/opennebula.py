"""The ``one`` driver: appliances of an OpenNebula appliance catalog (appmarket-simple).

Serves the official marketplace (marketplace.opennebula.io, the default) and the Community
Marketplace (community-marketplace.opennebula.io) alike: ``GET <ENDPOINT>/appliance`` answers
``{"appliances": [...]}``, picking the list for the OpenNebula version named at the start of the
``User-Agent``. Monitor only: the catalog is public and read-only, so import and delete are
refused by the base class.

Each appliance becomes the APP the stock monitor of the installed release line prints
(``Installation.release_line()``), so that switching drivers keeps every app oned has (oned
finds an app by NAME, ``MarketPlaceAppPool::import``, and updates it when VERSION, MD5 or
SOURCE changed). The stock rules, with the release that introduced them; ``L:n`` is line ``n``
of ``src/market_mad/remotes/one/monitor`` on branch ``one-L`` of OpenNebula/one (7.2, 7.4 and
master, 7.5.80, carry the 7.0 file with only its copyright line changed):

Since 6.10 (all releases):

- ``GET <ENDPOINT>/appliance`` with ``User-Agent: OpenNebula <VERSION> [<EDITION>] (Market
  Driver)``; ENDPOINT defaults to ``https://marketplace.opennebula.io/`` (6.10:29,41-48,160);
- NAME, SOURCE = LINK + ``/download/0``, IMPORT_ID = ``_id.$oid``, ORIGIN_ID ``-1``, TYPE
  (``IMAGE`` when absent), PUBLISHER, FORMAT, DESCRIPTION = ``short_description``, VERSION,
  TAGS joined with ``", "``, REGTIME = ``creation_time``, LINK (6.10:169-191); an appliance of
  another TYPE is left out (6.10:204-205);
- IMAGE: SIZE = ``files[0].size`` in MiB rounded up, 0 when it is 0 or not a number; MD5 =
  ``files[0].md5``; APPTEMPLATE64 = DEV_PREFIX and TYPE of ``files[0]`` (no DRIVER); none of
  these, and no VMTEMPLATE64, without ``files[0]`` (6.10:82-99);
- IMAGE's VMTEMPLATE64 and VMTEMPLATE's APPTEMPLATE64: ``opennebula_template`` (JSON text) as
  a template, left out when it is not JSON (6.10:101-110,125-134);
- VMTEMPLATE: SIZE 0, ``DISK = [NAME, APP]`` per ``disks`` entry (6.10:113-123);
- SERVICE_TEMPLATE: SIZE 0, ``ROLE = [NAME, APP]`` per ``roles`` member, APPTEMPLATE64 = the
  ``opennebula_template`` text unchanged (6.10:137-157).

6.10 only: LINK = ENDPOINT *as written* + ``appliance/<id>`` (6.10:41,170), so an ENDPOINT
without a final ``/`` gives SOURCEs that are not URLs (OpenNebula bug #6619; a WARN says so);
no ARCHITECTURE or HYPERVISOR; the VM template is the catalog's, without placement.

Since 7.0:

- ``/`` appended to ENDPOINT when missing (7.0:67, commit 5d5b774be1, #6619);
- ARCHITECTURE = ``os-arch`` with ``amd64`` -> ``x86_64``, ``arm64`` -> ``aarch64``, empty ->
  ``all``, anything else as written; HYPERVISOR = ``hypervisor`` lower-cased, ``kvm`` when empty
  or ``ALL`` (7.0:200-201,313-332, commit 63c38d7fb0, #7044);
- the VM template gains ``SCHED_REQUIREMENTS = "HYPERVISOR=<h>"``, with ``" & ARCH=<a>"`` for
  aarch64 only (7.0:286 tests ``amd64``, a name already mapped to x86_64), written after the
  appliance's own as ``"<own> & ..."``; the aarch64 OS section (ARCH, FIRMWARE,
  FIRMWARE_SECURE, MACHINE) merged into OS; a top-level ``HYPERVISOR = "<h>"``
  (7.0:285-303, #7044);
- arrays of objects become repeated vectors, as several NIC (7.0:250-267, commit 674025ef51).

Deliberate differences, each unable to change an app's identity (README, "Compatibility with
the stock drivers"): templates are written by :mod:`onemarket.template` from the JSON's meaning
(stock interpolates values unescaped, writes arrays of strings as ``KEY = [ "v" ]`` in 7.x and
drops them in 6.10, and loses the whole template on a number or boolean: ours keeps them, an
addition where stock set nothing; conversion rules in :mod:`.vmtemplate`); DISK NAMEs are
derived from the appliance (stock: random at every monitor); LINK carries no
``user:password`` of ENDPOINT (SOURCE keeps them: the download needs them); MD5 comes from
``files[0].checksum.md5`` when ``files[0].md5`` is missing, and an ``md5`` that is not 32 hex
digits is left out with a WARN; a blank own SCHED_REQUIREMENTS is ignored (stock writes
``" & HYPERVISOR=kvm"``) and SCHED_REQUIREMENTS, OS and HYPERVISOR keys are matched in any case
(stock: exact, a lower-case key gives two attributes); an appliance that cannot be published
(no ``_id``, a ``hypervisor`` that would inject into SCHED_REQUIREMENTS, ...) is skipped with a
WARN where stock fails the whole monitor or publishes garbage; appliances sharing a NAME give
one APP, the last one's at the first one's place, which is what oned keeps of stock's output.

Bounds (a hostile catalog): at most :data:`CATALOG_MAX_BODY_BYTES` of answer and
:data:`CATALOG_MAX_JSON_VALUES` JSON values (checked before parsing, :mod:`onemarket.web`), at
most :data:`MAX_APPLIANCES` entries read, at most :data:`MAX_SKIP_WARNINGS` WARN lines about
appliances plus one summary. A catalog that cannot be read fails the whole monitor with one
line naming the marketplace (oned keeps its apps until a monitor succeeds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from .. import driverlog
from ..backends.attributes import Attr, read
from ..backends.base import AppEntry, Backend, MonitorResult
from ..errors import ConfigError, MarketError, RemoteError, one_line
from ..installation import ReleaseLine
from ..location import split_url
from ..template import write_template
from ..units import MAX_INT_DIGITS, MIB, shown
from ..web import CachedFetcher, display_url, fetch_json, make_session, public_url
from .vmtemplate import convert

DEFAULT_ENDPOINT = "https://marketplace.opennebula.io/"
AGENT = "Market Driver"

TYPE_IMAGE = "IMAGE"
TYPE_VMTEMPLATE = "VMTEMPLATE"
TYPE_SERVICE_TEMPLATE = "SERVICE_TEMPLATE"
APP_TYPES = (TYPE_IMAGE, TYPE_VMTEMPLATE, TYPE_SERVICE_TEMPLATE)

ARCH_ALL = "all"
STOCK_ARCHES = {"": ARCH_ALL, "amd64": "x86_64", "arm64": "aarch64"}
"""Catalog ``os-arch`` -> ARCHITECTURE, exactly as stock (7.0:321-332); others as written."""
STOCK_HYPERVISOR_DEFAULTS = ("", "ALL")
"""Catalog ``hypervisor`` values that mean kvm (7.0:316: exactly these, not ``all``)."""
HYPERVISOR_DEFAULT = "kvm"
SCHED_ARCH_CLAUSE = ("amd64", "aarch64")
"""Architectures that get ``& ARCH=<a>`` in SCHED_REQUIREMENTS (7.0:286; only aarch64 can
match, os-arch amd64 having become x86_64 before the test)."""
ARCH_ALIASES = {"": ARCH_ALL, "amd64": "x86_64", "arm64": "aarch64"}
"""ARCHITECTURES filter words and app architectures compared case-insensitively, aliases
mapped; these are ours (the filter has no stock counterpart)."""
HYPERVISOR_ALIASES = {"": HYPERVISOR_DEFAULT, "all": HYPERVISOR_DEFAULT}
AARCH64_OS = {
    "ARCH": "aarch64",
    "FIRMWARE": "/usr/share/AAVMF/AAVMF_CODE.fd",
    "FIRMWARE_SECURE": "no",
    "MACHINE": "virt",
}
"""OS section stock merges into the VM template of aarch64 appliances (7.0:52-57,294-301)."""

DISK_NAME_HEX_CHARS = 10
"""Length of the DISK NAME of VMTEMPLATE apps (stock: 10 random hex characters, 6.10:119; ours
are derived from the appliance so that the output is the same on every monitor)."""
LABEL_CHARS = 80
"""Longest appliance name quoted in a WARN line."""
NOTE_CHARS = 300
"""Longest detail (a list of template members) quoted in a WARN line."""
MAX_SKIP_WARNINGS = 10
"""WARN lines about appliances per monitor; the rest are counted in one summary line (oned logs
every line of every monitor, every 10 minutes by default)."""
MAX_APPLIANCES = 5000
"""Catalog entries read per monitor, the rest ignored with one WARN: the official and Community
catalogs list about 150; it bounds the time a hostile list of millions of entries costs."""
CATALOG_MAX_BODY_BYTES = 32 * 2**20
"""Largest catalog answer (a real one is about 1 MB): bounds download and decoded text."""
CATALOG_MAX_JSON_VALUES = 1_000_000
"""JSON values a catalog answer may hold (a real one ~25,000: 160 per appliance), checked
before parsing: bounds the parsed catalog to ~70 MB whatever its shape (``[{},{},...]``)."""

FILTER_ARCHITECTURES = "ARCHITECTURES"
FILTER_HYPERVISORS = "HYPERVISORS"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PLACEMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_EDITION_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
_SPLIT_RE = re.compile(r"[\s,]+")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_RUBY_INT_RE = re.compile(r"\s*[+-]?\d+(?:_\d+)*")
_RUBY_FLOAT_RE = re.compile(r"\s*[+-]?\d+(?:_\d+)*(?:\.\d+(?:_\d+)*)?(?:[eE][+-]?\d+)?")

Note = Callable[[str], None]


class BadAppliance(MarketError):
    """One catalog entry cannot be published (the message says why); the others still are."""


@dataclass(frozen=True)
class StockRules:
    """Where the stock monitors of the release lines differ (module docstring)."""

    since_7_0: bool
    """7.0's rules, which came together: a ``/`` appended to ENDPOINT when missing;
    ARCHITECTURE, HYPERVISOR and the VM template's placement."""

    @classmethod
    def of(cls, release: ReleaseLine) -> StockRules:
        return cls(since_7_0=release.is_7x)


RULES_7X = StockRules(since_7_0=True)
RULES_6_10 = StockRules(since_7_0=False)


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

    def admits(self, architecture: str, hypervisor: str) -> bool:
        """Whether an appliance of this (stock) ARCHITECTURE and HYPERVISOR is published."""
        arches = self.architectures
        if arches is not None and normalize_arch(architecture) not in arches | {ARCH_ALL}:
            return False
        return self.hypervisors is None or normalize_hypervisor(hypervisor) in self.hypervisors

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


@dataclass(frozen=True)
class Endpoint:
    """Where the catalog is read, and what its apps' SOURCE and LINK start with."""

    catalog_url: str
    source_prefix: str
    """``<ENDPOINT>[/]appliance/``, credentials included (a download needs them)."""
    link_prefix: str
    """The same without ``user:password@``: LINK is shown to every user who sees the app."""

    @classmethod
    def of(cls, endpoint: str, rules: StockRules = RULES_7X) -> Endpoint:
        base = base_url_of(endpoint)
        prefix = endpoint.strip()
        if rules.since_7_0 and not prefix.endswith("/"):
            prefix += "/"
        source = f"{prefix}appliance/"
        return cls(f"{base}/appliance", source, public_url(source))


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


def _ruby_numbers(value: object, what: str) -> tuple[int, float]:
    """Ruby's ``value.to_i`` and ``value.to_f`` (leading number of a string, else 0);
    BadAppliance where Ruby's would fail (``Infinity.to_i``, ``Infinity.ceil``: stock's
    FloatDomainError ends its whole monitor) or the number is absurd (a run of more than
    MAX_INT_DIGITS digits; JSON integers that long arrive as floats, web.loads_bounded)."""
    if isinstance(value, bool) or value is None:
        return 0, 0.0
    if isinstance(value, int):
        return value, float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadAppliance(f"{what} is not a finite number")
        return int(value), value
    if isinstance(value, str):
        whole = _RUBY_INT_RE.match(value)
        digits = whole.group().strip().lstrip("+-").replace("_", "") if whole else "0"
        if len(digits) > MAX_INT_DIGITS:
            raise BadAppliance(f"{what} {shown(value)} has more than {MAX_INT_DIGITS} digits")
        real = _RUBY_FLOAT_RE.match(value)
        as_float = float(real.group().replace("_", "")) if real else 0.0
        if not math.isfinite(as_float):
            raise BadAppliance(f"{what} {shown(value)} is not a finite number")
        return int(whole.group().replace("_", "")) if whole else 0, as_float
    return 0, 0.0


def stock_size_mb(value: object) -> int:
    """``files[0].size`` in MiB as stock: ``(size.to_f / 2**20).ceil if size.to_i != 0``, else
    0 (6.10:86-88): 0 for a missing, zero or non-numeric size, never negative; BadAppliance
    for an infinite or absurdly long one (:func:`_ruby_numbers`)."""
    as_int, as_float = _ruby_numbers(value, "files[0].size")
    if as_int == 0:
        return 0
    return max(0, math.ceil(as_float / MIB))


def _appliance_id(raw: Mapping[str, object]) -> str:
    oid = raw.get("_id")
    value = oid.get("$oid") if isinstance(oid, Mapping) else None
    if not isinstance(value, str):
        raise BadAppliance("no _id.$oid")
    if not _ID_RE.fullmatch(value):
        raise BadAppliance("_id.$oid is not a plain identifier")
    return value


def stock_architecture(raw: Mapping[str, object]) -> str:
    """ARCHITECTURE of an appliance, as stock 7.x writes it (7.0:321-332)."""
    value = _text(raw, "os-arch")
    return STOCK_ARCHES.get(value, value)


def stock_hypervisor(raw: Mapping[str, object]) -> str:
    """HYPERVISOR of an appliance, as stock 7.x writes it (7.0:313-319)."""
    value = _text(raw, "hypervisor")
    return HYPERVISOR_DEFAULT if value in STOCK_HYPERVISOR_DEFAULTS else value.lower()


def _placement(raw: Mapping[str, object], rules: StockRules) -> tuple[str, str]:
    """(ARCHITECTURE, HYPERVISOR); checked to be plain words where they reach the templates."""
    try:
        arch, hypervisor = stock_architecture(raw), stock_hypervisor(raw)
    except BadAppliance:
        if rules.since_7_0:
            raise
        return "", ""  # 6.10 publishes neither: nothing to refuse
    if rules.since_7_0:
        if not _PLACEMENT_RE.fullmatch(arch):
            raise BadAppliance("os-arch is not a plain architecture name")
        if not _PLACEMENT_RE.fullmatch(hypervisor):
            raise BadAppliance("hypervisor is not a plain hypervisor name")
    return arch, hypervisor


def _vm_template_doc(raw: Mapping[str, object], note: Note) -> dict | None:
    """The appliance's ``opennebula_template`` as a JSON object; ``None`` when it has none or
    it is not a JSON object (stock leaves the template out then, 6.10:105-110)."""
    value = raw.get("opennebula_template")
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            note("opennebula_template is not valid JSON: published without its VM template")
            return None
    if not isinstance(value, dict):
        note("opennebula_template is not a JSON object: published without its VM template")
        return None
    return value


def _key(doc: Mapping[str, object], name: str) -> str | None:
    """The member of ``doc`` that becomes attribute ``name`` (names are case-insensitive)."""
    for key in doc:
        if str(key).upper() == name:
            return key
    return None


def place(doc: Mapping[str, object], arch: str, hypervisor: str) -> dict:
    """The VM template with stock 7.x's placement (7.0:282-303): SCHED_REQUIREMENTS
    ``HYPERVISOR=<h>[ & ARCH=aarch64]`` after the appliance's own, the aarch64 OS section
    merged into OS, and HYPERVISOR. Members keep their place; new ones come last, in this
    order, as with Ruby's hash updates."""
    out = dict(doc)
    requirements = f"HYPERVISOR={hypervisor}"
    if arch in SCHED_ARCH_CLAUSE:
        requirements += f" & ARCH={arch}"
    key = _key(out, "SCHED_REQUIREMENTS") or "SCHED_REQUIREMENTS"
    own = out.get(key)
    out[key] = f"{own} & {requirements}" if isinstance(own, str) and own.strip() else requirements
    if arch == "aarch64":
        key = _key(out, "OS") or "OS"
        section = out.get(key)
        merged = dict(section) if isinstance(section, Mapping) else {}
        for name, value in AARCH64_OS.items():
            merged[_key(merged, name) or name] = value
        out[key] = merged
    out[_key(out, "HYPERVISOR") or "HYPERVISOR"] = hypervisor
    return out


def _b64(text: str) -> str:
    """Base64 of UTF-8 text; lone surrogates (JSON ``\\ud800`` escapes) become U+FFFD."""
    return base64.b64encode(_SURROGATE_RE.sub("\ufffd", text).encode("utf-8")).decode("ascii")


def _vm_template64(
    doc: Mapping[str, object], arch: str, hypervisor: str, rules: StockRules, note: Note
) -> str:
    converted = convert(place(doc, arch, hypervisor) if rules.since_7_0 else doc)
    if converted.dropped:
        note(
            "VM template members left out (not representable in a template): "
            + one_line(", ".join(converted.dropped), NOTE_CHARS)
        )
    return _b64(converted.text)


# --------------------------------------------------------------------------- one appliance


def appliance_to_app(
    raw: Mapping[str, object],
    endpoint: Endpoint,
    placement: tuple[str, str],
    rules: StockRules,
    note: Note,
) -> AppEntry:
    """One catalog appliance as the APP stock prints for it under ``rules``, with its
    ``placement`` (:func:`_placement`, read once for the filter and the APP); BadAppliance if
    it cannot be published. ``note`` receives remarks about what was left out of it."""
    app_id = _appliance_id(raw)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadAppliance("no name")
    app_type = raw.get("type") or TYPE_IMAGE
    if app_type not in APP_TYPES:
        raise BadAppliance(f"unknown type {one_line(str(app_type), 40)!r}")
    arch, hypervisor = placement

    tags = raw.get("tags")
    if tags is None:
        tags_text = ""
    elif isinstance(tags, list) and all(isinstance(t, str | int | float) for t in tags):
        tags_text = ", ".join(str(t) for t in tags)
    else:
        raise BadAppliance("tags is not a list of words")

    app = AppEntry(
        name=name,
        source=f"{endpoint.source_prefix}{app_id}/download/0",
        import_id=app_id,
        type=app_type,
        publisher=_text(raw, "publisher"),
        format=_text(raw, "format"),
        description=_text(raw, "short_description"),
        version=_text(raw, "version"),
        tags=tags_text,
        regtime=_number(raw, "creation_time"),
        link=f"{endpoint.link_prefix}{app_id}",
    )
    if rules.since_7_0:
        app.architecture, app.hypervisor = arch, hypervisor
    if app_type == TYPE_IMAGE:
        _fill_image(app, raw, arch, hypervisor, rules, note)
    elif app_type == TYPE_VMTEMPLATE:
        _fill_vmtemplate(app, raw, arch, hypervisor, rules, note)
    else:
        _fill_service_template(app, raw)
    return app


def _fill_image(
    app: AppEntry,
    raw: Mapping[str, object],
    arch: str,
    hypervisor: str,
    rules: StockRules,
    note: Note,
) -> None:
    files = raw.get("files")
    if not isinstance(files, list) or not files or files[0] is None:
        return  # stock prints no SIZE, MD5 or templates without files[0] (6.10:83)
    first = files[0] if isinstance(files[0], Mapping) else {}
    app.size_mb = stock_size_mb(first.get("size"))
    md5 = first.get("md5")
    checksum = first.get("checksum")
    if md5 in (None, "") and isinstance(checksum, Mapping):
        md5 = checksum.get("md5")
    if md5 not in (None, ""):
        if isinstance(md5, str) and _MD5_RE.fullmatch(md5):
            app.md5 = md5
        else:
            note("files[0].md5 is not an MD5 checksum: published without MD5")
    image_attrs = [
        ("DEV_PREFIX", _text(first, "dev_prefix", "files[0].")),
        ("TYPE", _text(first, "type", "files[0].")),
    ]
    image_attrs = [(n, v) for n, v in image_attrs if v]
    if image_attrs:
        app.apptemplate64 = _b64(write_template(image_attrs))
    doc = _vm_template_doc(raw, note)
    if doc is not None:
        app.vmtemplate64 = _vm_template64(doc, arch, hypervisor, rules, note)


def _fill_vmtemplate(
    app: AppEntry,
    raw: Mapping[str, object],
    arch: str,
    hypervisor: str,
    rules: StockRules,
    note: Note,
) -> None:
    app.size_mb = 0
    disks = raw.get("disks") or []
    if not isinstance(disks, list) or not all(isinstance(d, str) and d for d in disks):
        raise BadAppliance("disks is not a list of appliance names")
    for index, disk_app in enumerate(disks):
        seed = f"{app.import_id}\n{index}\n{disk_app}".encode("utf-8", "surrogatepass")
        disk_name = hashlib.sha256(seed).hexdigest()[:DISK_NAME_HEX_CHARS]
        app.disks.append({"NAME": disk_name, "APP": disk_app})
    doc = _vm_template_doc(raw, note)
    if doc is not None:
        app.apptemplate64 = _vm_template64(doc, arch, hypervisor, rules, note)


def _fill_service_template(app: AppEntry, raw: Mapping[str, object]) -> None:
    app.size_mb = 0
    roles = raw.get("roles") or {}
    if not isinstance(roles, Mapping) or not all(
        isinstance(r, str) and r and isinstance(a, str) and a for r, a in roles.items()
    ):
        raise BadAppliance("roles is not an object of role name -> appliance name")
    for role, role_app in roles.items():
        app.roles.append({"NAME": role, "APP": role_app})
    text = raw.get("opennebula_template")
    if isinstance(text, dict) and text:
        text = json.dumps(text)  # stock cannot encode an object and leaves it out (6.10:152-156)
    if isinstance(text, str) and text:
        app.apptemplate64 = _b64(text)  # the text as the catalog has it (6.10:153)


# --------------------------------------------------------------------------- the driver


def _label(raw: Mapping[str, object], index: int) -> str:
    """How a WARN line names an appliance: position, name and id when it has them."""
    label = f"appliance #{index}"
    name = raw.get("name")
    if isinstance(name, str) and name.strip():
        label += f" '{one_line(name, LABEL_CHARS)}'"
    oid = raw.get("_id")
    if isinstance(oid, Mapping) and isinstance(oid.get("$oid"), str):
        label += f" ({one_line(oid['$oid'], LABEL_CHARS)})"
    return label


def appliance_list(doc: object, url: str) -> list[object]:
    """The ``appliances`` array of a catalog answer; RemoteError if the answer has another shape."""
    where = display_url(url)
    if not isinstance(doc, Mapping):
        raise RemoteError(
            f"{where} did not answer an appliance catalog (JSON {type(doc).__name__})"
        )
    apps = doc.get("appliances")
    if not isinstance(apps, list):
        raise RemoteError(f"{where} did not answer an appliance catalog (no 'appliances' list)")
    return apps


class _Warnings:
    """WARN lines about appliances: the first :data:`MAX_SKIP_WARNINGS`, then one summary."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, text: str) -> None:
        self.count += 1
        if self.count <= MAX_SKIP_WARNINGS:
            driverlog.warn(text)

    def summary(self, skipped: int) -> None:
        if self.count > MAX_SKIP_WARNINGS:
            driverlog.warn(
                f"{self.count - MAX_SKIP_WARNINGS} more warnings about appliances not listed"
                f" ({skipped} appliances skipped in all)"
            )


def build_apps(
    appliances: Sequence[object],
    endpoint: Endpoint | str,
    flt: CatalogFilter | None = None,
    rules: StockRules = RULES_7X,
) -> tuple[list[AppEntry], int, int]:
    """APPs for the catalog's appliances, in catalog order; returns (apps, skipped, filtered).

    ``endpoint`` may be the ENDPOINT text. Of appliances sharing a NAME the last one is
    published, at the first one's place: stock prints both and oned, finding the app by name,
    ends up with the last one's template.
    """
    if isinstance(endpoint, str):
        endpoint = Endpoint.of(endpoint, rules)
    flt = flt or CatalogFilter()
    warn = _Warnings()
    apps: list[AppEntry] = []
    place_of: dict[str, int] = {}
    skipped = filtered = 0
    for index, raw in enumerate(islice(appliances, MAX_APPLIANCES)):
        if not isinstance(raw, Mapping):  # cheap: no label, no exception
            skipped += 1
            warn(f"skipping appliance #{index}: is a {type(raw).__name__}, not an object")
            continue
        label = _label(raw, index)
        try:
            placement = _placement(raw, rules)
            if flt.active and not flt.admits(*placement):
                filtered += 1
                continue
            app = appliance_to_app(
                raw, endpoint, placement, rules, lambda text, label=label: warn(f"{label}: {text}")
            )
        except MarketError as exc:
            skipped += 1
            warn(f"skipping {label}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one entry must never abort the monitor
            skipped += 1
            warn(f"skipping {label}: unexpected {type(exc).__name__}")
            continue
        if app.name in place_of:
            skipped += 1
            warn(f"{label}: replaces an earlier appliance of the same name (the last one wins)")
            apps[place_of[app.name]] = app
            continue
        place_of[app.name] = len(apps)
        apps.append(app)
    if len(appliances) > MAX_APPLIANCES:
        skipped += len(appliances) - MAX_APPLIANCES
        driverlog.warn(
            f"the catalog lists {len(appliances)} appliances: only the first {MAX_APPLIANCES}"
            " are read"
        )
    warn.summary(skipped)
    return apps, skipped, filtered


def user_agent(version: str, edition: str = "") -> str:
    """``OpenNebula <version> [<edition>] (Market Driver)``: the catalog picks its list by it."""
    if edition:
        return f"OpenNebula {version} {edition} ({AGENT})"
    return f"OpenNebula {version} ({AGENT})"


def base_url_of(endpoint: str) -> str:
    """The endpoint without trailing slashes; ConfigError unless it is an http(s) URL."""
    parts = split_url(endpoint.strip(), "ENDPOINT")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"ENDPOINT must be an http:// or https:// URL, not {display_url(endpoint)[:100]!r}"
        )
    driverlog.redact_url(endpoint)
    return endpoint.strip().rstrip("/")


class OpenNebulaCatalog(Backend):
    """Monitor of an OpenNebula appliance catalog (official or Community Marketplace)."""

    attributes = (
        Attr("ENDPOINT", "catalog server (appmarket-simple)", DEFAULT_ENDPOINT),
        Attr(FILTER_ARCHITECTURES, "publish only appliances for these architectures"),
        Attr(FILTER_HYPERVISORS, "publish only appliances for these hypervisors"),
    )

    driver = "one"

    def _remotes_word(self, name: str) -> str:
        """``remotes/<name>`` stripped, as stock reads it (6.10:35-42); "" unless a plain word
        (it goes into a header)."""
        try:
            path = self.context.installation.remotes / name
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""
        return text if _EDITION_RE.fullmatch(text) else ""

    def user_agent(self) -> str:
        """Stock's User-Agent: VERSION as written (``6.10.0.1``, not ``6.10.0``: the catalog
        picks its list by it), then EDITION when there is one."""
        version = self._remotes_word("VERSION") or self.context.installation.one_version()
        return user_agent(version, self._remotes_word("EDITION"))

    def monitor(self) -> MonitorResult:
        installation = self.context.installation
        rules = StockRules.of(installation.release_line())
        v = read(self.market, self.attributes)
        text = v["ENDPOINT"]
        endpoint = Endpoint.of(text, rules)
        if not rules.since_7_0 and not text.strip().endswith("/"):
            driverlog.warn(
                "ENDPOINT does not end with '/': like the stock driver of OpenNebula 6.10, the"
                " apps' SOURCE and LINK join it to 'appliance/<id>' as written and are not"
                " usable URLs (OpenNebula bug #6619, fixed in 7.0); add the final '/'"
            )
        flt = CatalogFilter.from_attrs(v[FILTER_ARCHITECTURES], v[FILTER_HYPERVISORS])
        url = endpoint.catalog_url
        session = make_session(self.user_agent())
        fetcher = CachedFetcher(
            session, installation.cache_dir, max_body_bytes=CATALOG_MAX_BODY_BYTES
        )
        try:
            doc, from_cache = fetch_json(fetcher, url, max_values=CATALOG_MAX_JSON_VALUES)
            appliances = appliance_list(doc, url)
        except RemoteError as exc:
            # the one line of a failed fetch, after the retries, naming the marketplace
            raise RemoteError(f"marketplace '{self.market.name}': {exc}") from None
        finally:
            session.close()
        apps, skipped, filtered = build_apps(appliances, endpoint, flt, rules)
        driverlog.info(
            f"{len(apps)} of {len(appliances)} appliances published from {display_url(url)}"
            f"{' (unchanged, cached copy)' if from_cache else ''}"
            f"{f', {skipped} skipped' if skipped else ''}"
            f"{f', {filtered} left out by filters' if filtered else ''}"
        )
        if not apps and appliances:
            driverlog.warn(
                "no appliance published: oned keeps the apps it already lists from this market"
            )
        return MonitorResult(used_mb=0, free_mb=0, total_mb=0, apps=apps)
