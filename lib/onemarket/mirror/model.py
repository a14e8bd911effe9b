"""The types a mirror run passes between its layers, and the rules every catalog shares.

:class:`Plan` (what to fetch, from ``one`` or ``simplestreams``) holds :class:`MirrorEntry`
items (one app and its catalog document as the mirror serves it), each with the
:class:`MirrorFile` items the store checks and the fetcher downloads; :class:`CatalogFormat`
says how the mirror's catalog files are written and read back for that kind of catalog.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..errors import ConfigError, UnsafePathError, one_line

MAX_SUFFIX_CHARS = 40
_SUFFIX_RE = re.compile(r"[A-Za-z0-9 ._()+\-\[\]]{1,40}")
MD5_RE = re.compile(r"[0-9a-f]{32}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")

Previous = dict[str, tuple[dict, list[str]]]
"""Entries of the mirror's current catalog: key -> (document, paths of its files)."""


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


@dataclass(frozen=True)
class CatalogFormat:
    """How one kind of catalog is written into the mirror and read back from it."""

    name: str
    files: tuple[str, ...]
    """The catalog files, in the order they are replaced (the one clients read first last)."""
    build: Callable[[Mapping[str, object], list[tuple[str, dict]]], dict[str, bytes]]
    """(top-level document, [(key, entry document)]) -> {file: bytes}."""
    previous: Callable[[Mapping[str, bytes]], Previous]
    """{file: bytes} of the current mirror -> its entries (empty when unreadable)."""


@dataclass
class Plan:
    format: CatalogFormat
    source_url: str
    entries: list[MirrorEntry]
    top: dict
    """The catalog's top-level document without its entries (``appliances``/``products``)."""
    catalog_fetches: int = 0
    from_cache: bool = False
    ranged_requests: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.format.name


def safe_relative(path: str) -> PurePosixPath:
    """A catalog path as a relative path inside the tree; UnsafePathError when it would leave
    it or name a hidden file (hidden names are the mirror's own: staged files, its state)."""
    rel = PurePosixPath(path)
    if not path or rel.is_absolute() or any(p in ("", ".", "..") for p in path.split("/")):
        raise UnsafePathError(f"catalog path {one_line(path, 120)!r} leaves the mirror folder")
    if any(part.startswith(".") for part in rel.parts):
        raise UnsafePathError(f"catalog path {one_line(path, 120)!r} names a hidden file")
    return rel


def positive(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf (JSON 1e999, 5000 digits)
        return None
    return number if number > 0 else None


def hex_digest(value: object, pattern: re.Pattern[str]) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    return text if pattern.fullmatch(text) else ""


def json_bytes(doc: object) -> bytes:
    """A catalog file: one line of JSON, as the catalog servers write theirs."""
    return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
