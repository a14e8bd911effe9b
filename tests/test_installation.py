"""Where things are: system layout and self-contained ONE_LOCATION."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from onemarket.installation import DEFAULT_ONE_VERSION, Installation


def test_system_layout() -> None:
    inst = Installation.detect({})
    assert inst.one_location is None
    assert inst.remotes == Path("/var/lib/one/remotes")
    assert inst.var_dir == Path("/var/lib/one")
    assert inst.mads_dir == Path("/usr/lib/one/mads")
    assert inst.market_remotes == Path("/var/lib/one/remotes/market")
    assert inst.datastore_remotes == Path("/var/lib/one/remotes/datastore")
    assert Installation.detect({"ONE_LOCATION": "  "}).one_location is None


def test_one_location_layout(tmp_path: Path) -> None:
    inst = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    assert inst.one_location == tmp_path
    assert inst.remotes == tmp_path / "var" / "remotes"
    assert inst.var_dir == tmp_path / "var"
    assert inst.mads_dir == tmp_path / "lib" / "mads"
    assert inst.market_remotes == tmp_path / "var" / "remotes" / "market"


def test_detect_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONE_LOCATION", str(tmp_path))
    assert Installation.detect().one_location == tmp_path


@pytest.mark.parametrize(
    ("text", "version"),
    [("7.0.1\n", "7.0.1"), ("6.10\n", "6.10"), ("OpenNebula 7.2.0-1", "7.2.0"), ("dev", None)],
)
def test_one_version(tmp_path: Path, text: str, version: str | None) -> None:
    inst = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    assert inst.one_version() == DEFAULT_ONE_VERSION  # no VERSION file
    inst.remotes.mkdir(parents=True)
    (inst.remotes / "VERSION").write_text(text)
    assert inst.one_version() == (version or DEFAULT_ONE_VERSION)


def test_cache_dir_prefers_var(tmp_path: Path) -> None:
    inst = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    assert inst.cache_dir == tmp_path / "var" / "cache" / "market"
    assert inst.cache_dir.is_dir()


def test_cache_dir_falls_back_when_var_is_not_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "var").write_text("a file where a folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    inst = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    assert inst.cache_dir == tmp_path / "xdg" / "onemarket"
    assert inst.cache_dir.is_dir()


def test_stock_downloader(tmp_path: Path) -> None:
    inst = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    assert inst.stock_downloader() is None
    inst.datastore_remotes.mkdir(parents=True)
    ours = inst.datastore_remotes / "downloader.sh"
    ours.write_text("#!/bin/sh\n")
    assert inst.stock_downloader() is None  # not executable
    os.chmod(ours, 0o755)
    assert inst.stock_downloader() == ours
    orig = inst.datastore_remotes / "downloader.sh.orig"
    orig.write_text("#!/bin/sh\n")
    os.chmod(orig, 0o755)
    assert inst.stock_downloader() == orig  # the original kept beside ours wins


@pytest.mark.parametrize(
    ("text", "line", "is_7x"),
    [
        ("6.10.0.1\n", (6, 10), False),
        ("7.5.80", (7, 5), True),
        ("7.0.0", (7, 0), True),
        ("garbage", (7, 0), True),
    ],
)
def test_release_line(tmp_path: Path, text: str, line: tuple[int, int], is_7x: bool) -> None:
    (tmp_path / "var" / "remotes").mkdir(parents=True)
    (tmp_path / "var" / "remotes" / "VERSION").write_text(text)
    rel = Installation.detect({"ONE_LOCATION": str(tmp_path)}).release_line()
    assert (rel.major, rel.minor) == line
    assert rel.is_7x is is_7x
