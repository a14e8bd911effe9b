"""Where OpenNebula keeps things: system layout, or self-contained under ``ONE_LOCATION``."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ONE_VERSION = "7.0"
"""OpenNebula version announced to catalogs when the installation does not say (remotes/VERSION)."""


@dataclass(frozen=True)
class Installation:
    one_location: Path | None
    remotes: Path
    var_dir: Path
    mads_dir: Path

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> Installation:
        env = os.environ if environ is None else environ
        loc = env.get("ONE_LOCATION", "").strip()
        if loc:
            base = Path(loc)
            return cls(base, base / "var" / "remotes", base / "var", base / "lib" / "mads")
        return cls(
            None, Path("/var/lib/one/remotes"), Path("/var/lib/one"), Path("/usr/lib/one/mads")
        )

    @property
    def market_remotes(self) -> Path:
        return self.remotes / "market"

    @property
    def datastore_remotes(self) -> Path:
        return self.remotes / "datastore"

    @property
    def cache_dir(self) -> Path:
        """Cache for catalog answers; falls back to a user folder when var is not writable."""
        preferred = self.var_dir / "cache" / "market"
        try:
            preferred.mkdir(parents=True, exist_ok=True)
            if os.access(preferred, os.W_OK):
                return preferred
        except OSError:
            pass
        fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onemarket"
        # a cache that cannot be created only costs full downloads: the fetcher copes with it
        with contextlib.suppress(OSError):
            fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    def one_version(self) -> str:
        """``major.minor`` of the installed OpenNebula, read from ``remotes/VERSION``."""
        try:
            text = (self.remotes / "VERSION").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return DEFAULT_ONE_VERSION
        m = re.search(r"\d+\.\d+(\.\d+)?", text)
        return m.group() if m else DEFAULT_ONE_VERSION

    def release_line(self) -> ReleaseLine:
        """Which stock drivers' rules apply: the release line of ``remotes/VERSION``."""
        return ReleaseLine.of(self.one_version())

    def stock_downloader(self) -> Path | None:
        """The stock datastore downloader (kept as ``downloader.sh.orig`` when ours replaced it)."""
        for name in ("downloader.sh.orig", "downloader.sh"):
            path = self.datastore_remotes / name
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None


@dataclass(frozen=True, order=True)
class ReleaseLine:
    """``major.minor`` of an OpenNebula release; the stock drivers' rules change between lines
    (6.10 LTS and 7.x differ in app names, SOURCEs and templates)."""

    major: int
    minor: int

    @classmethod
    def of(cls, version: str) -> ReleaseLine:
        m = re.match(r"\s*(\d+)\.(\d+)", version)
        if not m:
            m = re.match(r"(\d+)\.(\d+)", DEFAULT_ONE_VERSION)
            assert m is not None
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def is_7x(self) -> bool:
        """7.0 and later (7.0, 7.2, 7.4, master's 7.5.80): the rules of the 7.x stock drivers."""
        return self.major >= 7

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"
