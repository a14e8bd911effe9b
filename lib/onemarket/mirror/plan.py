"""What a mirror run fetches, decided with the catalog readers' own code.

The source catalog is read and filtered exactly as its driver does (``opennebula.build_apps``
with the template's ARCHITECTURES/HYPERVISORS, ``linuxcontainers.select_builds`` and
``build_apps`` with its LxcOptions), so the mirror holds what the driver would publish, no more.
Then ``--include``/``--exclude`` pick apps by name, templates bring the appliances they name,
and ``--name-suffix`` renames apps and the references to them.

Each selected app becomes a :class:`MirrorEntry`: its files (relative path in the mirror, URL,
size and checksums from the catalog) and its catalog document as the mirror serves it (links
relative, so the tree can be moved and served anywhere).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import requests

from .. import driverlog
from ..action import Market
from ..backends.base import AppEntry
from ..catalogs import linuxcontainers as lxc
from ..catalogs import opennebula as one
from ..catalogs.qcow2 import VirtualSizeCache, virtual_sizes
from ..errors import ConfigError, MarketError, RemoteError, UnsafePathError, one_line
from ..installation import Installation
from ..web import CachedFetcher, fetch_json

KIND_ONE = "one"
KIND_SIMPLESTREAMS = "simplestreams"
DRIVER_KINDS = {"one": KIND_ONE, lxc.DRIVER: KIND_SIMPLESTREAMS}

ONE_CATALOG_FILE = "appliance.json"
"""What ``GET <ENDPOINT>/appliance`` answers, as a file (the web server maps one to the other)."""
SS_INDEX_FILE = "streams/v1/index.json"
SS_IMAGES_FILE = lxc.CATALOG_PATH
SS_INDEX_PATH_IN_INDEX = SS_IMAGES_FILE
METADATA_FTYPES = ("incus.tar.xz", "lxd.tar.xz")
"""The metadata tarball (both names point at the same file); LXD and Incus need it with the
root file, OpenNebula's lxd downloader reads only the root file."""

MAX_SUFFIX_CHARS = 40
_SUFFIX_RE = re.compile(r"[A-Za-z0-9 ._()+\-\[\]]{1,40}")
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_DEPENDENCY_WARNINGS = 20


@dataclass(frozen=True)
class Selection:
    """Which apps to mirror beyond the driver's own filters, and how to rename them."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    name_suffix: str = ""

    def __post_init__(self) -> None:
        if self.name_suffix and not _SUFFIX_RE.fullmatch(self.name_suffix):
            raise ConfigError(
                f"--name-suffix {one_line(self.name_suffix, 60)!r}: use at most "
                f"{MAX_SUFFIX_CHARS} letters, digits, blanks or ._()+-[]"
            )

    def picks(self, name: str) -> bool:
        """``--include`` (any; none means all) then ``--exclude`` (any), case-insensitive."""
        low = name.lower()
        if self.include and not any(fnmatch.fnmatch(low, g.lower()) for g in self.include):
            return False
        return not any(fnmatch.fnmatch(low, g.lower()) for g in self.exclude)


@dataclass(frozen=True)
class MirrorFile:
    """One file of the mirror: where it goes, where it comes from, what it must be."""

    path: str
    url: str
    size: int | None
    md5: str = ""
    sha256: str = ""
    version: str = ""

    @property
    def identity(self) -> str:
        """What makes two copies the same file: the checksums, else the size and version."""
        if self.md5 or self.sha256:
            return f"size={self.size} md5={self.md5} sha256={self.sha256}"
        return f"size={self.size} version={self.version}"


@dataclass
class MirrorEntry:
    """One mirrored app (an appliance, or a simplestreams product with its newest build)."""

    key: str
    names: tuple[str, ...]
    version: str
    files: tuple[MirrorFile, ...]
    doc: dict

    @property
    def label(self) -> str:
        return " + ".join(self.names)

    @property
    def size_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass
class Plan:
    kind: str
    source_url: str
    entries: list[MirrorEntry]
    top: dict
    """The catalog's top-level document without its entries (``appliances``/``products``)."""
    catalog_fetches: int = 0
    from_cache: bool = False
    ranged_requests: int = 0
    warnings: list[str] = field(default_factory=list)


def safe_relative(path: str) -> PurePosixPath:
    """A catalog path as a relative path inside the tree; UnsafePathError when it would leave
    it or name a hidden file (hidden names are the mirror's own: staged files, its state)."""
    rel = PurePosixPath(path)
    if not path or rel.is_absolute() or any(p in ("", ".", "..") for p in path.split("/")):
        raise UnsafePathError(f"catalog path {one_line(path, 120)!r} leaves the mirror folder")
    if any(part.startswith(".") for part in rel.parts):
        raise UnsafePathError(f"catalog path {one_line(path, 120)!r} names a hidden file")
    return rel


# --------------------------------------------------------------------------- catalog files


def catalog_files(kind: str, top: Mapping[str, object], docs: Iterable[tuple[str, dict]]) -> dict:
    """The mirror's catalog files (path -> bytes) listing ``docs`` (key, entry document)."""
    docs = list(docs)
    if kind == KIND_ONE:
        body = {**top, "appliances": [doc for _key, doc in docs]}
        return {ONE_CATALOG_FILE: _json_bytes(body)}
    images = {**top, "products": dict(docs)}
    index = {
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": SS_INDEX_PATH_IN_INDEX,
                "format": "products:1.0",
                "products": sorted(key for key, _doc in docs),
            }
        },
        "format": "index:1.0",
    }
    # images.json first: index.json, which clients read first, then never names a product
    # images.json does not have yet
    return {SS_IMAGES_FILE: _json_bytes(images), SS_INDEX_FILE: _json_bytes(index)}


def catalog_file_names(kind: str) -> tuple[str, ...]:
    return (ONE_CATALOG_FILE,) if kind == KIND_ONE else (SS_IMAGES_FILE, SS_INDEX_FILE)


def _json_bytes(doc: object) -> bytes:
    return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")


def previous_entries(kind: str, catalogs: Mapping[str, bytes]) -> dict[str, tuple[dict, list]]:
    """Entries of the mirror's current catalog: key -> (document, paths of its files)."""
    try:
        if kind == KIND_ONE:
            doc = json.loads(catalogs[ONE_CATALOG_FILE])
            out = {}
            for raw in doc.get("appliances", []):
                app_id = raw["_id"]["$oid"]
                paths = [path for path, _n, _f in _one_files(app_id, raw)]
                out[app_id] = (raw, paths)
            return out
        doc = json.loads(catalogs[SS_IMAGES_FILE])
        return {
            key: (product, sorted(_product_paths(product)))
            for key, product in doc.get("products", {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def previous_top(kind: str, catalogs: Mapping[str, bytes]) -> dict | None:
    """The top-level document of the mirror's current catalog, entries left out."""
    name = ONE_CATALOG_FILE if kind == KIND_ONE else SS_IMAGES_FILE
    try:
        doc = json.loads(catalogs[name])
    except (KeyError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    doc.pop("appliances" if kind == KIND_ONE else "products", None)
    return doc


def _product_paths(product: Mapping[str, object]) -> set[str]:
    paths = set()
    for version in product.get("versions", {}).values():
        for item in version.get("items", {}).values():
            paths.add(item["path"])
    return paths


# --------------------------------------------------------------------------- one catalogs


def _one_files(app_id: str, raw: Mapping[str, object]) -> list[tuple[str, int, Mapping]]:
    """(mirror path, index, file) of the appliance's downloadable files (the catalog server
    answers 404 for a file without size or URL, so the mirror has none either)."""
    out = []
    files = raw.get("files")
    if not isinstance(files, list):
        return out
    for n, f in enumerate(files):
        if not isinstance(f, Mapping) or not f.get("url") or not _positive(f.get("size")):
            continue
        out.append((f"appliance/{app_id}/download/{n}", n, f))
    return out


def _positive(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _hex(value: object, pattern: re.Pattern[str]) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    return text if pattern.fullmatch(text) else ""


def _one_file(base_url: str, app_id: str, n: int, f: Mapping, version: str, path: str):
    checksum = f.get("checksum") if isinstance(f.get("checksum"), Mapping) else {}
    return MirrorFile(
        path=path,
        url=f"{base_url}/appliance/{app_id}/download/{n}",
        size=_positive(f.get("size")),
        md5=_hex(f.get("md5") or checksum.get("md5"), _MD5_RE),
        sha256=_hex(checksum.get("sha256"), _SHA256_RE),
        version=version,
    )


def _references(raw: Mapping[str, object]) -> list[str]:
    """App names a VM template (``disks``) or a service template (``roles``) refers to."""
    disks = raw.get("disks")
    roles = raw.get("roles")
    names = [d for d in disks if isinstance(d, str)] if isinstance(disks, list) else []
    if isinstance(roles, Mapping):
        names += [a for a in roles.values() if isinstance(a, str)]
    return names


def _renamed_one_doc(raw: Mapping, app_id: str, suffix: str, mirrored: set[str]) -> dict:
    """The appliance as the mirror serves it: renamed, references renamed, links relative."""
    doc = copy.deepcopy(dict(raw))

    def rename(name: str) -> str:
        return name + suffix if name in mirrored else name

    doc["name"] = rename(doc["name"])
    if isinstance(doc.get("disks"), list):
        doc["disks"] = [rename(d) if isinstance(d, str) else d for d in doc["disks"]]
    if isinstance(doc.get("roles"), Mapping):
        doc["roles"] = {r: rename(a) if isinstance(a, str) else a for r, a in doc["roles"].items()}
    links = doc.get("links")
    if isinstance(links, dict) and isinstance(links.get("download"), dict):
        links["download"] = {**links["download"], "href": f"appliance/{app_id}/download"}
    for path, n, _f in _one_files(app_id, raw):
        doc["files"][n] = {**doc["files"][n], "url": path}
    return doc


def plan_one(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    """Appliances of a ``one`` catalog the driver publishes, selected and their references."""
    base_url = one.base_url_of(market.attr("ENDPOINT", one.DEFAULT_ENDPOINT) or "")
    flt = one.CatalogFilter.from_attrs(
        market.attr(one.FILTER_ARCHITECTURES), market.attr(one.FILTER_HYPERVISORS)
    )
    url = f"{base_url}/appliance"
    doc, from_cache = fetch_json(CachedFetcher(session, installation.cache_dir), url)
    appliances = one.appliance_list(doc, url)
    apps, _skipped, _filtered = one.build_apps(appliances, base_url, flt)
    raw_by_id = {}
    for raw in appliances:
        try:
            raw_by_id[raw["_id"]["$oid"]] = raw  # type: ignore[index]
        except (KeyError, TypeError):
            continue
    by_name = {app.name: app for app in apps}
    chosen = [app.name for app in apps if selection.picks(app.name)]
    wanted = set(chosen)
    warnings: list[str] = []
    queue = list(chosen)
    while queue:  # bounded: each published name enters the queue at most once
        app = by_name[queue.pop()]
        for ref in _references(raw_by_id[app.import_id]):
            if ref in wanted:
                continue
            if ref not in by_name:
                if len(warnings) < MAX_DEPENDENCY_WARNINGS:
                    warnings.append(
                        f"'{one_line(app.name, 80)}' refers to '{one_line(ref, 80)}', "
                        "which this catalog does not publish"
                    )
                continue
            wanted.add(ref)
            queue.append(ref)
    entries = []
    for app in apps:
        if app.name not in wanted:
            continue
        raw = raw_by_id[app.import_id]
        files = tuple(
            _one_file(base_url, app.import_id, n, f, app.version, path)
            for path, n, f in _one_files(app.import_id, raw)
        )
        entries.append(
            MirrorEntry(
                key=app.import_id,
                names=(app.name + selection.name_suffix,),
                version=app.version,
                files=files,
                doc=_renamed_one_doc(raw, app.import_id, selection.name_suffix, wanted),
            )
        )
    top = {k: v for k, v in doc.items() if k != "appliances"}  # type: ignore[union-attr]
    return Plan(KIND_ONE, url, entries, top, 1, from_cache, 0, warnings)


# --------------------------------------------------------------------------- simplestreams


def _product_key(products: Mapping[str, object], build: lxc.Build) -> str:
    ss_arch = lxc.ONE_TO_SIMPLESTREAMS_ARCH.get(build.arch, build.arch)
    key = f"{build.distro}:{build.release}:{ss_arch}:{build.variant}"
    if key in products:
        return key
    for candidate in products:  # an architecture name the driver does not translate back
        parts = str(candidate).split(":")
        if (
            len(parts) == 4
            and (parts[0], parts[1], parts[3]) == (build.distro, build.release, build.variant)
            and lxc.SIMPLESTREAMS_TO_ONE_ARCH.get(parts[2], parts[2]) == build.arch
        ):
            return str(candidate)
    raise RemoteError(f"product of {build.distro}:{build.release} not found again in the catalog")


def _renamed_key(key: str, suffix: str) -> str:
    """The suffix goes after the release: the driver builds app names from the product key
    (``<distro>_<release>[_<variant>] - LXC``), so this is where a name can change."""
    if not suffix:
        return key
    distro, release, arch, variant = key.split(":")
    return f"{distro}:{release}{suffix}:{arch}:{variant}"


def plan_simplestreams(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    """Products whose newest build the ``linuxcontainers`` driver publishes, with the items
    those apps need (root file or qcow2 disk, and the metadata tarball)."""
    if ":" in selection.name_suffix:
        raise ConfigError("--name-suffix must not contain ':' for a simplestreams catalog")
    opts = lxc.LxcOptions.from_market(market, installation.release_line())
    cache_dir = installation.cache_dir
    url = opts.catalog_url
    catalog, from_cache = fetch_json(CachedFetcher(session, cache_dir), url)
    builds = lxc.select_builds(catalog, opts, url)
    products = catalog["products"]  # type: ignore[index]
    sizes: dict[str, int] = {}
    ranged = 0
    if opts.vm_images:
        wanted = {
            b.disk.sha256: opts.endpoint + b.disk.path
            for b in builds
            if b.disk is not None and b.variant in opts.vm_variants
        }
        lookup = virtual_sizes(session, wanted, VirtualSizeCache.in_dir(cache_dir))
        ranged = lookup.requests
        sizes = lookup.sizes
    apps = lxc.build_apps(opts, builds, sizes)
    by_link = {app.link: app for app in apps}
    entries = []
    warnings: list[str] = []
    for build in builds:
        picked = []
        for item in (build.rootfs, build.disk):
            app = by_link.get(opts.endpoint + item.path) if item is not None else None
            if app is not None and selection.picks(app.name):
                picked.append((item, app))
        if not picked:
            continue
        try:
            entries.append(_ss_entry(opts, products, build, picked, selection, sizes))
        except (MarketError, KeyError, TypeError, AttributeError) as exc:
            what = f"{build.distro}:{build.release}:{build.arch}:{build.variant}"
            warnings.append(f"skipping product {one_line(what, 120)}: {one_line(str(exc), 200)}")
    top = {k: v for k, v in catalog.items() if k != "products"}  # type: ignore[union-attr]
    return Plan(KIND_SIMPLESTREAMS, url, entries, top, 1, from_cache, ranged, warnings)


def _ss_entry(
    opts: lxc.LxcOptions,
    products: Mapping[str, dict],
    build: lxc.Build,
    picked: list[tuple[lxc.Item, AppEntry]],
    selection: Selection,
    sizes: Mapping[str, int],
) -> MirrorEntry:
    """The newest build of one product, limited to the items the picked apps need."""
    key = _product_key(products, build)
    product = products[key]
    version = product["versions"][build.serial]
    items = version["items"]
    keep = {name for name, raw in items.items() if raw.get("ftype") in METADATA_FTYPES}
    keep |= {n for n in METADATA_FTYPES if n in items}
    picked_paths = {item.path for item, _app in picked}
    keep |= {name for name, raw in items.items() if raw.get("path") in picked_paths}
    kept_items = {name: items[name] for name in items if name in keep}
    files: dict[str, MirrorFile] = {}
    for raw in kept_items.values():
        path = raw.get("path")
        if not isinstance(path, str):
            raise RemoteError("an item has no path")
        safe_relative(path)
        files.setdefault(
            path,
            MirrorFile(
                path=path,
                url=opts.endpoint + path,
                size=_positive(raw.get("size")),
                sha256=_hex(raw.get("sha256"), _SHA256_RE),
                version=build.serial,
            ),
        )
    doc = {k: v for k, v in product.items() if k != "versions"}
    doc["versions"] = {build.serial: {**version, "items": kept_items}}
    suffix = selection.name_suffix
    names = tuple(app.name for _item, app in picked)
    if suffix:  # the names the driver will give the renamed product
        renamed = dataclasses.replace(build, release=build.release + suffix)
        links = {opts.endpoint + item.path for item, _app in picked}
        names = tuple(
            app.name for app in lxc.build_apps(opts, [renamed], sizes) if app.link in links
        )
    return MirrorEntry(
        key=_renamed_key(key, suffix),
        names=names,
        version=build.serial,
        files=tuple(files.values()),
        doc=doc,
    )


def make_plan(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    kind = DRIVER_KINDS.get(market.driver)
    if kind is None:
        raise ConfigError(
            f"marketplace '{market.name}' has MARKET_MAD={market.driver}: only the public "
            "catalogs one and linuxcontainers can be mirrored"
        )
    planner = plan_one if kind == KIND_ONE else plan_simplestreams
    plan = planner(market, session, installation, selection)
    for warning in plan.warnings:
        driverlog.warn(warning)
    return plan
