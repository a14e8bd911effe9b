"""Mirror of a ``one`` catalog (appmarket-simple): appliances and their files.

The catalog is read and filtered as the ``one`` driver does (``opennebula.build_apps`` with
the template's ARCHITECTURES/HYPERVISORS); then ``--include``/``--exclude`` pick apps by name,
templates bring the appliances they name (VM templates their ``disks``, service templates
their ``roles``), and ``--name-suffix`` renames apps and those references. The mirror serves
``appliance.json`` (the ``/appliance`` answer, links relative) and
``appliance/<id>/download/<n>``, the files themselves, where every ``one`` driver's SOURCE
points.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

import requests

from ..action import Market
from ..catalogs import opennebula as one
from ..errors import one_line
from ..installation import Installation
from ..web import CachedFetcher, fetch_json
from .model import (
    MD5_RE,
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
)

CATALOG_FILE = "appliance.json"
"""What ``GET <ENDPOINT>/appliance`` answers, as a file (the web server maps one to the other)."""
MAX_DEPENDENCY_WARNINGS = 20


def build(top: Mapping[str, object], docs: list[tuple[str, dict]]) -> dict[str, bytes]:
    return {CATALOG_FILE: json_bytes({**top, "appliances": [doc for _key, doc in docs]})}


def previous(catalogs: Mapping[str, bytes]) -> Previous:
    try:
        doc = json.loads(catalogs[CATALOG_FILE])
        out = {}
        for raw in doc.get("appliances", []):
            app_id = raw["_id"]["$oid"]
            out[app_id] = (raw, [path for path, _n, _f in _files(app_id, raw)])
        return out
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


FORMAT = CatalogFormat("one", (CATALOG_FILE,), build, previous)


def _files(app_id: str, raw: Mapping[str, object]) -> list[tuple[str, int, Mapping]]:
    """(mirror path, index, file) of the appliance's downloadable files (the catalog server
    answers 404 for a file without size or URL, so the mirror has none either)."""
    out = []
    files = raw.get("files")
    if not isinstance(files, list):
        return out
    for n, f in enumerate(files):
        if not isinstance(f, Mapping) or not f.get("url") or not positive(f.get("size")):
            continue
        out.append((f"appliance/{app_id}/download/{n}", n, f))
    return out


def _file(base_url: str, app_id: str, n: int, f: Mapping, version: str, path: str) -> MirrorFile:
    checksum = f.get("checksum") if isinstance(f.get("checksum"), Mapping) else {}
    return MirrorFile(
        path=path,
        url=f"{base_url}/appliance/{app_id}/download/{n}",
        size=positive(f.get("size")),
        md5=hex_digest(f.get("md5") or checksum.get("md5"), MD5_RE),
        sha256=hex_digest(checksum.get("sha256"), SHA256_RE),
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


def _served_doc(raw: Mapping, app_id: str, suffix: str, mirrored: set[str]) -> dict:
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
    for path, n, _f in _files(app_id, raw):
        doc["files"][n] = {**doc["files"][n], "url": path}
    return doc


def plan(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    """Appliances of a ``one`` catalog the driver publishes, selected and their references."""
    base_url = one.base_url_of(market.attr("ENDPOINT", one.DEFAULT_ENDPOINT) or "")
    flt = one.CatalogFilter.from_attrs(
        market.attr(one.FILTER_ARCHITECTURES), market.attr(one.FILTER_HYPERVISORS)
    )
    url = f"{base_url}/appliance"
    # the monitor's own bounds: a hostile catalog costs the mirror no more than the driver
    fetcher = CachedFetcher(
        session, installation.cache_dir, max_body_bytes=one.CATALOG_MAX_BODY_BYTES
    )
    doc, from_cache = fetch_json(fetcher, url, max_values=one.CATALOG_MAX_JSON_VALUES)
    appliances = one.appliance_list(doc, url)
    rules = one.StockRules.of(installation.release_line())  # the installed release's driver
    apps, _skipped, _filtered = one.build_apps(appliances, base_url, flt, rules)
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
            _file(base_url, app.import_id, n, f, app.version, path)
            for path, n, f in _files(app.import_id, raw)
        )
        entries.append(
            MirrorEntry(
                key=app.import_id,
                names=(app.name + selection.name_suffix,),
                version=app.version,
                files=files,
                doc=_served_doc(raw, app.import_id, selection.name_suffix, wanted),
            )
        )
    top = {k: v for k, v in doc.items() if k != "appliances"}  # type: ignore[union-attr]
    return Plan(FORMAT, url, entries, top, 1, from_cache, 0, warnings)
