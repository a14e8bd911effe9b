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

    def stock_downloader(self) -> Path | None:
        """The stock datastore downloader (kept as ``downloader.sh.orig`` when ours replaced it)."""
        for name in ("downloader.sh.orig", "downloader.sh"):
            path = self.datastore_remotes / name
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None
