"""OpenNebula's context package for a container, found, fetched and turned into an overlay.

Where the package comes from, first match wins:

1. ``CONTEXT_PACKAGES`` of the marketplace (in the export's action data), else
   ``ONE_MARKET_CONTEXT_PACKAGES`` in the environment (put it in ``/etc/one/defaultrc``): a
   folder on the front-end, or an http(s) URL of a folder listing (nginx/Apache index) or of a
   GitHub-style release document (``assets[].browser_download_url``). ``none`` turns
   contextualization off.
2. The default: the latest release of OpenNebula/one-apps from the GitHub releases API, as the
   stock ``lxd_downloader.sh`` does.

Which package a distribution gets follows the stock script (suffixes of the release assets):
``.deb`` for Debian, Ubuntu and Devuan; ``.apk`` for Alpine; ``el8.noarch.rpm`` for AlmaLinux,
Rocky Linux, CentOS and Oracle Linux 8 and Fedora up to 40; ``el9.noarch.rpm`` for those at 9,
Fedora 41 and later and Amazon Linux; ``suse.noarch.rpm`` for openSUSE. Other distributions get
no package and a ``/root/opennebula_context.log`` saying so, as stock writes.

Without root there is no chroot and no package manager: the package's files are unpacked into
the image (owned as the package says) and its services are enabled the way ``systemctl enable``
and ``rc-update add`` would (the ``[Install] WantedBy=`` links of its systemd units; OpenRC
scripts in the ``default`` runlevel). Its dependencies and post-install script are not run:
one WARN line names the dependencies that were skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from . import driverlog
from .errors import ConfigError, RemoteError, SourceError, one_line
from .location import url_problem
from .transfer.stages import Decompressor

CONTEXT_ATTR = "CONTEXT_PACKAGES"
CONTEXT_ENV = "ONE_MARKET_CONTEXT_PACKAGES"
GITHUB_RELEASES_API = "https://api.github.com/repos/OpenNebula/one-apps/releases/latest"
OFF_WORDS = ("none", "no", "off", "false")
_HEX8_RE = re.compile(rb"[0-9A-Fa-f]{8}")
MAX_PACKAGE_BYTES = 64 << 20
"""Largest context package accepted (the real ones are about 100 KiB)."""
MAX_LISTING_BYTES = 8 << 20
NOT_SUPPORTED_LOG = "root/opennebula_context.log"
_HREF_RE = re.compile(r"""href\s*=\s*["']([^"'#?]+)["']""", re.IGNORECASE)
_WANTED_BY_RE = re.compile(r"^\s*(WantedBy|RequiredBy)\s*=\s*(.+)$", re.MULTILINE)
_UNIT_RE = re.compile(r"^(?:usr/)?lib/systemd/system/([^/]+\.(?:service|path|timer|socket))$")


@dataclass(frozen=True)
class Family:
    """A distribution family: the asset suffix of its package and the package's format."""

    name: str
    suffix: str
    kind: str  # deb, apk, rpm


DEB = Family("Debian family", "deb", "deb")
APK = Family("Alpine", "apk", "apk")
EL8 = Family("Enterprise Linux 8", "el8.noarch.rpm", "rpm")
EL9 = Family("Enterprise Linux 9", "el9.noarch.rpm", "rpm")
SUSE = Family("openSUSE", "suse.noarch.rpm", "rpm")
FEDORA_EL9_FROM = 41


def _major(release: str) -> int | None:
    m = re.match(r"(\d+)", release)
    return int(m.group(1)) if m else None


def family_for(distro: str, release: str) -> Family | None:
    """The context package family of a distribution (the stock script's table)."""
    distro = distro.lower()
    major = _major(release)
    if distro in ("ubuntu", "debian", "devuan"):
        return DEB
    if distro == "alpine":
        return APK
    if distro == "opensuse":
        return SUSE
    if distro == "amazonlinux":
        return EL9
    if distro == "fedora":
        return EL9 if major is not None and major >= FEDORA_EL9_FROM else EL8
    if distro in ("almalinux", "rockylinux", "centos", "oracle"):
        return {8: EL8, 9: EL9}.get(major or 0)
    return None


@dataclass
class Overlay:
    """What contextualization adds: a tar to unpack over the rootfs, and what it skipped."""

    tar: Path | None
    package: str = ""
    install_kind: str = ""
    """How the package manager installs it: deb, apk, rpm or suse (contextroot)."""
    package_in_image: str = ""
    """Where the package file itself was put in the image (for the package manager), or ""."""
    skipped_depends: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)


def configured_source(attrs: Mapping[str, str], environ: Mapping[str, str]) -> str:
    return (attrs.get(CONTEXT_ATTR) or environ.get(CONTEXT_ENV) or "").strip()


def _http_get(session: Any, url: str, limit: int, timeouts: tuple[float, float]) -> bytes:
    from .web import CachedFetcher

    try:
        return CachedFetcher(session, None, *timeouts, max_body_bytes=limit).get(url).body
    except RemoteError as exc:
        raise RemoteError(f"context package source: {exc}") from None


def list_candidates(source: str, session: Any, timeouts: tuple[float, float]) -> dict[str, str]:
    """{file name: URL or path} of the packages a source offers."""
    if source and not re.match(r"https?://", source):
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(
                f"{CONTEXT_ATTR}={one_line(source, 200)!r} is neither a folder nor an http(s) URL"
            )
        return {p.name: str(p) for p in sorted(folder.iterdir()) if p.is_file()}
    url = source or GITHUB_RELEASES_API
    body = _http_get(session, url, MAX_LISTING_BYTES, timeouts)
    with_json: object = None
    with contextlib.suppress(ValueError):
        with_json = json.loads(body)
    out: dict[str, str] = {}
    if isinstance(with_json, dict):
        for asset in with_json.get("assets") or []:
            link = asset.get("browser_download_url") if isinstance(asset, dict) else None
            if isinstance(link, str):
                out[link.rsplit("/", 1)[-1]] = link
        return out
    base = url if url.endswith("/") else url + "/"
    for href in _HREF_RE.findall(body.decode("utf-8", "replace")):
        name = href.rstrip("/").rsplit("/", 1)[-1]
        if name and not href.endswith("/") and url_problem(href) is None:
            out[name] = urljoin(base, href)  # an href urllib cannot split is no package
    return out


def _version_key(name: str) -> list[object]:
    return [int(p) if p.isascii() and p.isdigit() else p for p in re.split(r"([0-9]+)", name)]


def choose(candidates: Mapping[str, str], family: Family) -> str | None:
    """The newest ``one-context`` package with the family's suffix (any name as a fallback)."""
    names = [n for n in candidates if n.endswith(family.suffix)]
    if family.suffix == "deb":
        names = [n for n in names if n.endswith(".deb")]
    preferred = [n for n in names if n.startswith("one-context")] or names
    return max(preferred, key=_version_key) if preferred else None


# --------------------------------------------------------------------------------------------
# Package formats -> (file members, depends)


MAX_UNPACKED_BYTES = 4 * MAX_PACKAGE_BYTES
"""Most bytes one compressed member of a context package may unpack to (the real packages
unpack to a few MB): a crafted one cannot fill memory."""
TOOL_TIMEOUT_S = 120.0
"""Longest run of the zstd command on one member."""


def _too_big() -> SourceError:
    return SourceError(f"the context package unpacks to more than {MAX_UNPACKED_BYTES} bytes")


_COMPRESSIONS = {".xz": "xz", ".lzma": "lzma", ".gz": "gzip", ".bz2": "bzip2"}
"""Member name endings and the :class:`stages.Decompressor` kind for each."""


def _decompress(name: str, data: bytes) -> bytes:
    """``data`` uncompressed by its name's suffix, bounded by MAX_UNPACKED_BYTES."""
    if name.endswith(".zst"):
        out = _unzstd(data, MAX_UNPACKED_BYTES + 1)
        if len(out) > MAX_UNPACKED_BYTES:
            raise _too_big()
        return out
    kind = next((k for end, k in _COMPRESSIONS.items() if name.endswith(end)), None)
    return data if kind is None else _unpack(kind, data, f"the context package's {name}")


def _unpack(kind: str, data: bytes, what: str) -> bytes:
    """All members of ``data`` (an .apk is several gzip ones), at most MAX_UNPACKED_BYTES."""
    dec = Decompressor(kind, what)
    out = bytearray()
    for piece in dec.feed(data):
        out += piece
        if len(out) > MAX_UNPACKED_BYTES:
            raise _too_big()
    dec.finish()
    return bytes(out)


def _unzstd(data: bytes, limit: int) -> bytes:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise SourceError("the context package is zstd-compressed and zstd is not installed")
    with tempfile.TemporaryFile() as src:
        src.write(data)
        src.seek(0)
        proc = subprocess.Popen(
            [zstd, "-dc"], stdin=src, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            out = proc.stdout.read(limit)
        finally:
            proc.kill()
            proc.stdout.close()
            code = proc.wait(TOOL_TIMEOUT_S)
    if len(out) < limit and code not in (0, -9):
        raise SourceError("the context package's zstd data is corrupt")
    return out


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise SourceError("not a .deb (ar) archive")
    out: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        field = header[48:58].decode("ascii", "replace").strip() or "0"
        if not field.isdigit() or pos + 60 + int(field) > len(data):
            raise SourceError("the .deb has a malformed member header")
        size = int(field)
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size & 1)
    return out


def _tar_files(raw: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for m in tar:
            fh = tar.extractfile(m) if m.isreg() else None
            members.append((m, fh.read() if fh else None))
    return members


def read_deb(data: bytes) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], list[str]]:
    parts = _ar_members(data)
    data_name = next((n for n in parts if n.startswith("data.tar")), None)
    control_name = next((n for n in parts if n.startswith("control.tar")), None)
    if data_name is None:
        raise SourceError("the .deb has no data.tar")
    files = _tar_files(_decompress(data_name, parts[data_name]))
    depends: list[str] = []
    if control_name is not None:
        for m, body in _tar_files(_decompress(control_name, parts[control_name])):
            if m.name.lstrip("./") == "control" and body is not None:
                m2 = re.search(
                    r"^(?:Pre-)?Depends:\s*(.+)$", body.decode("utf-8", "replace"), re.MULTILINE
                )
                if m2:
                    depends = [d.strip().split(" ")[0] for d in m2.group(1).split(",")]
    return files, [d for d in depends if d]


def read_apk(data: bytes) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], list[str]]:
    raw = _unpack("gzip", data, "not an .apk (gzip) package")
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []
    depends: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", ignore_zeros=True) as tar:
        for m in tar:
            fh = tar.extractfile(m) if m.isreg() else None
            body = fh.read() if fh else None
            if m.name == ".PKGINFO" and body is not None:
                depends = re.findall(
                    r"^depend\s*=\s*(\S+)", body.decode("utf-8", "replace"), re.MULTILINE
                )
            if m.name.startswith("."):
                continue  # .PKGINFO, .SIGN.*, install scripts: metadata, not files
            files.append((m, body))
    return files, depends


def read_rpm(data: bytes) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], list[str]]:
    """The cpio payload of an .rpm (lead, signature and main headers skipped)."""
    if not data.startswith(b"\xed\xab\xee\xdb"):
        raise SourceError("not an .rpm package")
    pos = 96
    requires: list[str] = []
    for n in range(2):
        if data[pos : pos + 3] != b"\x8e\xad\xe8":
            raise SourceError("the .rpm has a malformed header")
        count = int.from_bytes(data[pos + 8 : pos + 12], "big")
        size = int.from_bytes(data[pos + 12 : pos + 16], "big")
        index, store = pos + 16, pos + 16 + count * 16
        if store + size > len(data):
            raise SourceError("the .rpm has a malformed header")
        if n == 1:
            for i in range(count):
                tag, _type, off, cnt = (
                    int.from_bytes(data[index + i * 16 + j : index + i * 16 + j + 4], "big")
                    for j in (0, 4, 8, 12)
                )
                if tag == 1049:  # RPMTAG_REQUIRENAME
                    strings = data[store + off :].split(b"\0")[:cnt]
                    requires = [s.decode("utf-8", "replace") for s in strings]
        pos = store + size
        if n == 0:
            pos += (8 - pos % 8) % 8
    payload = data[pos:]
    for magic, ext in (
        (b"\xfd7zXZ", ".xz"),
        (b"\x1f\x8b", ".gz"),
        (b"\x28\xb5\x2f\xfd", ".zst"),
        (b"BZh", ".bz2"),
    ):
        if payload.startswith(magic):
            payload = _decompress(ext, payload)
            break
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []
    p = 0
    while p + 110 <= len(payload) and payload[p : p + 6] in (b"070701", b"070702"):
        raw = [payload[p + 6 + 8 * i : p + 14 + 8 * i] for i in range(13)]
        if not all(_HEX8_RE.fullmatch(f) for f in raw):
            raise SourceError("the .rpm's cpio payload is malformed")
        fields = [int(f, 16) for f in raw]
        mode, uid, gid, mtime, fsize, namesize = (
            fields[1],
            fields[2],
            fields[3],
            fields[5],
            fields[6],
            fields[11],
        )
        name = payload[p + 110 : p + 110 + namesize - 1].decode("utf-8", "surrogateescape")
        p = (p + 110 + namesize + 3) & ~3
        body = payload[p : p + fsize]
        p = (p + fsize + 3) & ~3
        if name == "TRAILER!!!":
            break
        info = tarfile.TarInfo(name)
        info.mode, info.uid, info.gid, info.mtime = mode & 0o7777, uid, gid, mtime
        kind = mode & 0o170000
        if kind == 0o040000:
            info.type = tarfile.DIRTYPE
            files.append((info, None))
        elif kind == 0o120000:
            info.type, info.linkname = tarfile.SYMTYPE, body.decode("utf-8", "surrogateescape")
            files.append((info, None))
        elif kind == 0o100000:
            info.size = len(body)
            files.append((info, body))
    return files, [r for r in requires if not r.startswith(("rpmlib(", "/"))]


READERS = {"deb": read_deb, "apk": read_apk, "rpm": read_rpm}


def enable_services(
    members: list[tuple[tarfile.TarInfo, bytes | None]], kind: str
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The links ``systemctl enable``/``rc-update add`` would make for the package's services."""
    links: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for m, body in members:
        name = m.name.lstrip("./")
        unit = _UNIT_RE.match(name)
        if unit and body is not None:
            for _, targets in _WANTED_BY_RE.findall(body.decode("utf-8", "replace")):
                for target in targets.split():
                    link = tarfile.TarInfo(f"etc/systemd/system/{target}.wants/{unit.group(1)}")
                    link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/" + name, 0o777
                    links.append((link, None))
        elif kind == "apk" and name.startswith("etc/init.d/") and m.isreg():
            service = name.rsplit("/", 1)[-1]
            link = tarfile.TarInfo(f"etc/runlevels/default/{service}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/" + name, 0o777
            links.append((link, None))
    return links


def write_overlay(members: list[tuple[tarfile.TarInfo, bytes | None]], out: Path) -> None:
    now = int(time.time())
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, body in members:
            if not info.mtime:
                info.mtime = now
            if body is not None:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                info.size = 0
                tar.addfile(info)


def not_supported_overlay(distro: str, release: str, out: Path) -> None:
    info = tarfile.TarInfo(NOT_SUPPORTED_LOG)
    info.mode = 0o644
    write_overlay(
        [(info, f"{distro}-{release} is not supported by OpenNebula context\n".encode())], out
    )


def build_overlay(
    distro: str,
    release: str,
    attrs: Mapping[str, str],
    environ: Mapping[str, str],
    session: Any,
    workdir: Path,
    timeouts: tuple[float, float],
    include_package_file: bool = False,
) -> Overlay:
    """The context overlay for a distribution, or a WARN and the stock 'not supported' note."""
    source = configured_source(attrs, environ)
    if source.lower() in OFF_WORDS:
        origin = CONTEXT_ATTR if attrs.get(CONTEXT_ATTR) else CONTEXT_ENV
        driverlog.info(f"contextualization off ({origin}={source})")
        return Overlay(tar=None)
    out = workdir / "context-overlay.tar"
    family = family_for(distro, release)
    if family is None:
        driverlog.warn(
            f"no OpenNebula context package for {distro} {release}: the container "
            "is not contextualized"
        )
        not_supported_overlay(distro, release, out)
        return Overlay(tar=out)
    where = source or GITHUB_RELEASES_API
    candidates = list_candidates(source, session, timeouts)
    name = choose(candidates, family)
    if name is None:
        raise SourceError(
            f"no context package ending in {family.suffix} ({family.name}) at {where}"
        )
    location = candidates[name]
    if re.match(r"https?://", location):
        data = _http_get(session, location, MAX_PACKAGE_BYTES, timeouts)
    else:
        try:
            if os.path.getsize(location) > MAX_PACKAGE_BYTES:
                raise SourceError(
                    f"context package {location} is larger than {MAX_PACKAGE_BYTES} bytes"
                )
            data = Path(location).read_bytes()
        except OSError as exc:
            raise SourceError(
                f"cannot read context package {location}: {exc.strerror or exc}"
            ) from None
    try:
        members, depends = READERS[family.kind](data)
    except SourceError as exc:
        raise SourceError(f"context package {location}: {exc}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise SourceError(
            f"context package {name} is not a valid {family.kind} ({type(exc).__name__})"
        ) from None
    links = enable_services(members, family.kind)
    extra: list[tuple[tarfile.TarInfo, bytes | None]] = []
    in_image = ""
    if include_package_file:
        in_image = f"/root/{name}"
        info = tarfile.TarInfo(in_image.lstrip("/"))
        info.mode = 0o600
        extra.append((info, data))
    write_overlay(members + links + extra, out)
    overlay = Overlay(
        tar=out,
        package=name,
        install_kind="suse" if family is SUSE else family.kind,
        package_in_image=in_image,
        skipped_depends=depends,
        services=[m.name.rsplit("/", 1)[-1] for m, _ in links],
    )
    driverlog.info(
        f"context package {name} from {where} added "
        f"({len(members)} entries, services enabled: "
        f"{', '.join(sorted(set(overlay.services))) or 'none'})"
    )
    return overlay
