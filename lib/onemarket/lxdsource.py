"""Where an ``lxd://`` SOURCE's rootfs is, what it must be, and its verified bytes.

The ``linuxcontainers`` catalog publishes container apps as
``lxd://<ENDPOINT><path>?size=<MB>&filesystem=<fs>&format=<raw|qcow2>`` (the stock monitor's
form). The SOURCE does not say where ENDPOINT ends, so the rootfs is looked up in the server's
``streams/v1/images.json``: the split whose catalog lists ``path`` wins, trying first the
marketplace's own ENDPOINT (from the export's action data), then each ``images/`` in the URL,
rightmost first. The catalog is fetched through the same conditional-GET cache, with the same
User-Agent, as the marketplace monitor, so an export right after a monitor costs a 304.

The item found gives the sha256 and size the download is checked against: a rootfs that does not
match is refused before anything is built from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

from . import driverlog
from .catalogs.linuxcontainers import (
    CATALOG_PATH,
    CONTAINER_FORMATS,
    DEFAULT_FILESYSTEM,
    DEFAULT_FORMAT,
    DEFAULT_IMAGE_SIZE_MB,
    MAX_IMAGE_SIZE_MB,
    SIMPLESTREAMS_TO_ONE_ARCH,
)
from .errors import ChecksumError, ConfigError, RemoteError, SourceError, one_line
from .location import split_url
from .transfer.hashing import Verifier
from .transfer.sources import CHUNK_BYTES
from .units import parse_int, shown

SCHEME = "lxd://"
MAX_ENDPOINT_GUESSES = 4
"""Catalog URLs tried for one SOURCE (the market's ENDPOINT, then ``images/`` splits)."""
DOWNLOAD_CHUNK_BYTES = CHUNK_BYTES
_SAFE_PATH_RE = re.compile(r"[A-Za-z0-9._~:@+,=/%-]+")
_FS_RE = re.compile(r"[a-z0-9]{1,16}")


@dataclass(frozen=True)
class LxdSource:
    """An ``lxd://`` SOURCE, parsed: the rootfs URL and the disk it asks for."""

    url: str
    size_mb: int
    filesystem: str
    format: str

    @classmethod
    def parse(cls, source: str) -> LxdSource:
        if not source.startswith(SCHEME):
            raise ConfigError(f"{one_line(source, 200)!r} is not an lxd:// source")
        url, _, query = source[len(SCHEME) :].partition("?")
        driverlog.redact_url(url)  # ENDPOINT's user:password@ stays in SOURCE only, never logged
        if not re.fullmatch(r"https?://[^\s?#]+", url):
            raise ConfigError(f"lxd:// source {one_line(source, 200)!r} has no http(s) URL")
        split_url(url, "the lxd:// source's image address")
        args = dict(parse_qsl(query, keep_blank_values=False))
        size_text = args.get("size", str(DEFAULT_IMAGE_SIZE_MB)).strip()
        try:
            size_mb = parse_int(size_text)
        except ValueError:
            size_mb = 0
        if not 0 < size_mb <= MAX_IMAGE_SIZE_MB:
            raise ConfigError(
                f"lxd:// source: size={shown(size_text)} is not a size in MB "
                f"(1 to {MAX_IMAGE_SIZE_MB})"
            )
        filesystem = args.get("filesystem", DEFAULT_FILESYSTEM).strip().lower()
        if not _FS_RE.fullmatch(filesystem):
            raise ConfigError(f"lxd:// source: filesystem={one_line(filesystem, 40)!r} is invalid")
        fmt = args.get("format", DEFAULT_FORMAT).strip().lower()
        if fmt not in CONTAINER_FORMATS:
            raise ConfigError(f"lxd:// source: format={one_line(fmt, 40)!r} is not raw or qcow2")
        return cls(url=url, size_mb=size_mb, filesystem=filesystem, format=fmt)

    def splits(self, market_endpoint: str | None) -> list[tuple[str, str]]:
        """(endpoint, path) candidates, most likely first."""
        out: list[tuple[str, str]] = []
        if market_endpoint:
            ep = market_endpoint.strip()
            ep = ep if ep.endswith("/") else ep + "/"
            if self.url.startswith(ep) and len(self.url) > len(ep):
                out.append((ep, self.url[len(ep) :]))
        starts = [m.start() + 1 for m in re.finditer("/images/", self.url)]
        for cut in reversed(starts):
            pair = (self.url[:cut], self.url[cut:])
            if pair not in out and "://" in pair[0] and pair[0].index("://") + 3 < cut:
                out.append(pair)
        return out[:MAX_ENDPOINT_GUESSES]


@dataclass(frozen=True)
class Rootfs:
    """The catalog's record of one rootfs tarball."""

    endpoint: str
    path: str
    sha256: str
    size: int
    distro: str
    release: str
    arch: str  # OpenNebula name
    variant: str
    serial: str

    @property
    def url(self) -> str:
        return self.endpoint + self.path


def find_in_catalog(catalog: object, endpoint: str, path: str) -> Rootfs | None:
    """The item whose ``path`` is ``path`` in a parsed images.json, or None."""
    products = catalog.get("products") if isinstance(catalog, dict) else None
    if not isinstance(products, dict):
        return None
    for key, product in products.items():
        versions = product.get("versions") if isinstance(product, dict) else None
        if not isinstance(versions, dict):
            continue
        for serial, version in versions.items():
            items = version.get("items") if isinstance(version, dict) else None
            if not isinstance(items, dict):
                continue
            for item in items.values():
                if not isinstance(item, dict) or item.get("path") != path:
                    continue
                sha, size = item.get("sha256"), item.get("size")
                if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
                    raise SourceError(f"catalog {endpoint}{CATALOG_PATH}: {path} has no sha256")
                if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                    raise SourceError(f"catalog {endpoint}{CATALOG_PATH}: {path} has no size")
                parts = ([*str(key).split(":"), "", "", "", ""])[:4]
                distro, release, ss_arch, variant = parts
                return Rootfs(
                    endpoint=endpoint,
                    path=path,
                    sha256=sha.lower(),
                    size=size,
                    distro=distro,
                    release=release,
                    arch=SIMPLESTREAMS_TO_ONE_ARCH.get(ss_arch, ss_arch),
                    variant=variant,
                    serial=str(serial),
                )
    return None


def locate(
    src: LxdSource,
    fetch_catalog: Callable[[str], object],
    market_endpoint: str | None = None,
) -> Rootfs:
    """Look the rootfs up in its server's catalog (``fetch_catalog(url)`` -> parsed JSON)."""
    tried: list[str] = []
    last_error: RemoteError | None = None
    for endpoint, path in src.splits(market_endpoint):
        if not _SAFE_PATH_RE.fullmatch(path) or ".." in path.split("/"):
            continue
        url = endpoint + CATALOG_PATH
        tried.append(url)
        try:
            catalog = fetch_catalog(url)
        except RemoteError as exc:
            last_error = exc
            continue
        found = find_in_catalog(catalog, endpoint, path)
        if found is not None:
            return found
    if not tried:
        raise SourceError(f"lxd:// source {src.url}: no images/ path to look up in a catalog")
    if last_error is not None and len(tried) == 1:
        raise last_error
    raise SourceError(
        f"rootfs {src.url} is not in the catalog {' or '.join(tried)} (the server keeps only "
        "the last builds: refresh the marketplace and export the app again)"
    )


# --------------------------------------------------------------------------------------------
# Download (the reader: transfer.sources.ResumingReader over an HttpSource)


def save_verified(reader: Any, rootfs: Rootfs, out: BinaryIO, progress: Any = None) -> None:
    """Copy ``reader`` (the rootfs bytes, at most ``rootfs.size``) to ``out``, checking the
    size and sha256 the catalog announced: a short, long or altered file is refused."""
    verifier = Verifier(f"rootfs {rootfs.url}", [("sha256", rootfs.sha256, "catalog")])
    got = 0
    while data := reader.read(DOWNLOAD_CHUNK_BYTES):
        got += len(data)
        verifier.update(data)
        out.write(data)
        if progress is not None:
            progress.update(len(data))
    if got != rootfs.size:
        raise ChecksumError(
            f"rootfs {rootfs.url}: {got} bytes downloaded, the catalog says {rootfs.size}"
        )
    verifier.verify()


def market_endpoint(attrs: Mapping[str, str]) -> str | None:
    """The ENDPOINT of the market attributes (password masked in every log line)."""
    endpoint = (attrs.get("ENDPOINT") or "").strip()
    if endpoint:
        driverlog.redact_url(endpoint)
    return endpoint or None


def rootfs_suffix(path: str | Path) -> str:
    """``tar.xz``, ``tar.gz``...: the archive type a rootfs path names."""
    name = str(path).rsplit("/", 1)[-1]
    m = re.search(r"\.(tar\.[a-z0-9]+|tar|t[gx]z)$", name)
    return m.group(1) if m else "tar.xz"
