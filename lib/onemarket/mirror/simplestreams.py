"""Mirror of a Linux Containers (simplestreams) catalog: the newest builds the driver uses.

The catalog is read and filtered as the ``linuxcontainers`` driver does (``LxcOptions`` of the
template under the installed release's rules, ``select_builds``, ``build_apps``, the qcow2
virtual sizes for ``VM_IMAGES``); ``--include``/``--exclude`` pick apps by name. Each product
keeps its newest build and, of its items, the root file the apps need (``root.tar.xz``,
``disk.qcow2``) and the metadata tarball; ``streams/v1/images.json`` and ``index.json`` list
what was mirrored, item paths as in the source (relative), so clients find them in the tree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import requests

from ..action import Market
from ..backends.base import AppEntry
from ..catalogs import linuxcontainers as lxc
from ..catalogs.qcow2 import VirtualSizeCache, virtual_sizes
from ..errors import ConfigError, MarketError, RemoteError, one_line
from ..installation import Installation
from ..web import CachedFetcher, fetch_json
from .model import (
    SHA256_RE,
    CatalogFormat,
    MirrorEntry,
    MirrorFile,
    Plan,
    Previous,
    Selection,
    hex_digest,
    json_bytes,
    positive,
    safe_relative,
)

INDEX_FILE = "streams/v1/index.json"
IMAGES_FILE = lxc.CATALOG_PATH
METADATA_FTYPES = ("incus.tar.xz", "lxd.tar.xz")
"""The metadata tarball (both names point at the same file); LXD and Incus need it with the
root file, OpenNebula's lxd downloader reads only the root file."""


def build(top: Mapping[str, object], docs: list[tuple[str, dict]]) -> dict[str, bytes]:
    images = {**top, "products": dict(docs)}
    index = {
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": IMAGES_FILE,
                "format": "products:1.0",
                "products": sorted(key for key, _doc in docs),
            }
        },
        "format": "index:1.0",
    }
    # images.json first: index.json, which clients read first, then never names a product
    # images.json does not have yet
    return {IMAGES_FILE: json_bytes(images), INDEX_FILE: json_bytes(index)}


def previous(catalogs: Mapping[str, bytes]) -> Previous:
    try:
        doc = json.loads(catalogs[IMAGES_FILE])
        return {
            key: (product, sorted(_product_paths(product)))
            for key, product in doc.get("products", {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


FORMAT = CatalogFormat("simplestreams", (IMAGES_FILE, INDEX_FILE), build, previous)


def _product_paths(product: Mapping[str, object]) -> set[str]:
    paths = set()
    for version in product.get("versions", {}).values():
        for item in version.get("items", {}).values():
            paths.add(item["path"])
    return paths


def _renamed_key(key: str, suffix: str) -> str:
    """The suffix goes after the release: the driver builds app names from the product key
    (``<distro>_<release>[_<variant>] - LXC``), so this is where a name can change."""
    if not suffix:
        return key
    distro, release, arch, variant = key.split(":")
    return f"{distro}:{release}{suffix}:{arch}:{variant}"


def plan(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    """Products whose newest build the ``linuxcontainers`` driver publishes, with the items
    those apps need (root file or qcow2 disk, and the metadata tarball)."""
    if ":" in selection.name_suffix:
        raise ConfigError("--name-suffix must not contain ':' for a simplestreams catalog")
    opts = lxc.LxcOptions.from_market(market, installation.release_line())
    cache_dir = installation.cache_dir
    url = opts.catalog_url
    # the monitor's own bounds: a hostile catalog costs the mirror no more than the driver
    fetcher = CachedFetcher(session, cache_dir, max_body_bytes=lxc.MAX_CATALOG_BYTES)
    catalog, from_cache = fetch_json(fetcher, url, max_values=lxc.MAX_JSON_VALUES)
    builds = lxc.select_builds(catalog, opts, url)
    products = catalog["products"]  # type: ignore[index]
    sizes: dict[str, int] = {}
    ranged = 0
    if opts.vm_images:
        wanted = lxc.vm_disks(opts, builds)
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
            app = by_link.get(opts.public_endpoint + item.path) if item is not None else None
            if app is not None and selection.picks(app.name):
                picked.append((item, app))
        if not picked:
            continue
        try:
            entries.append(_ss_entry(opts, products, build, picked, selection, sizes))
        except (MarketError, KeyError, TypeError, AttributeError) as exc:
            what = one_line(build.key, 120)
            warnings.append(f"skipping product {what}: {one_line(str(exc), 200)}")
    top = {k: v for k, v in catalog.items() if k != "products"}  # type: ignore[union-attr]
    return Plan(FORMAT, url, entries, top, 1, from_cache, ranged, warnings)


def _ss_entry(
    opts: lxc.LxcOptions,
    products: Mapping[str, dict],
    build: lxc.Build,
    picked: list[tuple[lxc.Item, AppEntry]],
    selection: Selection,
    sizes: Mapping[str, int],
) -> MirrorEntry:
    """The newest build of one product, limited to the items the picked apps need."""
    key = build.key
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
                size=positive(raw.get("size")),
                sha256=hex_digest(raw.get("sha256"), SHA256_RE),
                version=build.serial,
            ),
        )
    doc = {k: v for k, v in product.items() if k != "versions"}
    doc["versions"] = {build.serial: {**version, "items": kept_items}}
    suffix = selection.name_suffix
    names = tuple(app.name for _item, app in picked)
    if suffix:  # the names the driver will give the renamed product
        renamed = dataclasses.replace(build, release=build.release + suffix)
        links = {opts.public_endpoint + item.path for item, _app in picked}
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
