"""install.sh over an empty tree and over one holding the stock drivers: what it replaces, what
it keeps, and that -r puts everything back."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install.sh"
DRIVERS = ("http", "s3", "one", "linuxcontainers")
ACTIONS = ("import", "delete", "monitor")


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def stock_tree(root: Path) -> None:
    """A ONE_LOCATION holding stand-ins for the stock MAD, market remotes and other drivers."""
    files = {
        "lib/mads/one_market": "#!/bin/bash\nexec ruby one_market.rb\n",
        "lib/mads/one_market.rb": "# stock ruby MAD\n",
        "lib/mads/one_datastore": "#!/bin/bash\n# another subsystem\n",
        "var/remotes/datastore/downloader.sh": "#!/bin/bash\necho stock downloader\n",
        "var/remotes/datastore/fs/export": "#!/bin/bash\necho export\n",
        "var/remotes/market/s3/S3.rb": "# stock helper\n",
        "var/remotes/market/custom/monitor": "#!/bin/sh\necho USED_MB=1\n",
    }
    for d in DRIVERS:
        for a in ACTIONS:
            files[f"var/remotes/market/{d}/{a}"] = f"#!/bin/bash\n# stock {d} {a}\n"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)


def test_help_and_bad_option() -> None:
    assert run_install("-h").returncode == 0
    bad = run_install("-x")
    assert bad.returncode == 2
    assert "Usage" in bad.stderr


def test_install_over_stock_keeps_originals_and_remove_restores(tmp_path: Path) -> None:
    stock_tree(tmp_path)
    before = snapshot(tmp_path)
    res = run_install("-d", str(tmp_path), "-P", sys.executable)
    assert res.returncode == 0, res.stderr
    assert "MARKET_MAD" in res.stdout and "run install.sh again" in res.stdout

    mad = tmp_path / "lib/mads/one_market"
    assert f'PY="{sys.executable}"' in mad.read_text()
    assert "onemarket.mad" in mad.read_text()
    assert (
        tmp_path / "lib/mads/one_market.orig"
    ).read_text() == "#!/bin/bash\nexec ruby one_market.rb\n"
    for d in DRIVERS:
        for a in ACTIONS:
            script = tmp_path / f"var/remotes/market/{d}/{a}"
            assert "onemarket.runner" in script.read_text()
            assert os.access(script, os.X_OK)
            assert (script.parent / f"{a}.orig").exists()
    downloader = tmp_path / "var/remotes/datastore/downloader.sh"
    assert "onemarket.downloader" in downloader.read_text()
    assert (tmp_path / "var/remotes/datastore/downloader.sh.orig").exists()
    assert (tmp_path / "bin/one-market").exists()
    # other subsystems and custom drivers untouched
    after = snapshot(tmp_path)
    for rel in (
        "lib/mads/one_datastore",
        "lib/mads/one_market.rb",
        "var/remotes/datastore/fs/export",
        "var/remotes/market/custom/monitor",
        "var/remotes/market/s3/S3.rb",
    ):
        assert after[rel] == before[rel]

    # idempotent: a second run changes nothing and keeps the first originals
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    assert snapshot(tmp_path) == after

    res = run_install("-r", "-d", str(tmp_path))
    assert res.returncode == 0, res.stderr
    restored = snapshot(tmp_path)
    restored.pop("lib/onemarket.manifest", None)
    assert restored == before


def test_install_into_empty_dir_and_remove(tmp_path: Path) -> None:
    res = run_install("-d", str(tmp_path), "-P", sys.executable)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "var/remotes/market/http/import").exists()
    assert run_install("-r", "-d", str(tmp_path)).returncode == 0
    assert list(tmp_path.rglob("*")) == []  # files and the folders it created


def test_remove_without_install_is_a_clear_error(tmp_path: Path) -> None:
    res = run_install("-r", "-d", str(tmp_path))
    assert res.returncode == 1
    assert "nothing to remove" in res.stderr


@pytest.mark.parametrize("action", ACTIONS)
def test_installed_action_runs_with_its_interpreter(tmp_path: Path, action: str) -> None:
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    script = tmp_path / f"var/remotes/market/one/{action}"
    env = dict(os.environ, ONE_LOCATION=str(tmp_path))
    res = subprocess.run(
        [str(script), "bm90IHhtbA==", "7"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 1
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1


def test_reinstall_after_an_upgrade_keeps_the_newer_stock_files(tmp_path: Path) -> None:
    """An OpenNebula upgrade restores stock files; -r must put back those, not the old ones."""
    stock_tree(tmp_path)
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    upgraded = "#!/bin/bash\n# stock http import, next release\n"
    script = tmp_path / "var/remotes/market/http/import"
    script.write_text(upgraded)  # what the package upgrade does
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    assert (tmp_path / "var/remotes/market/http/import.orig").read_text() == upgraded
    assert run_install("-r", "-d", str(tmp_path)).returncode == 0
    assert script.read_text() == upgraded


def test_remove_after_an_upgrade_without_reinstall_keeps_the_upgrade(tmp_path: Path) -> None:
    stock_tree(tmp_path)
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    upgraded = "#!/bin/bash\n# stock one_market, next release\n"
    mad = tmp_path / "lib/mads/one_market"
    mad.write_text(upgraded)
    assert run_install("-r", "-d", str(tmp_path)).returncode == 0
    assert mad.read_text() == upgraded
    assert not (tmp_path / "lib/mads/one_market.orig").exists()


def test_downloader_run_by_hand_hands_over_to_the_original_beside_it(tmp_path: Path) -> None:
    """No ONE_LOCATION (an administrator running it from a shell, cwd elsewhere): the wrapper
    names the original beside itself, not the system layout's."""
    stock_tree(tmp_path)
    assert run_install("-d", str(tmp_path), "-P", sys.executable).returncode == 0
    env = {"PATH": os.environ.get("PATH", "")}
    res = subprocess.run(
        ["var/remotes/datastore/downloader.sh", "/no/such/image", "-"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.stdout == "stock downloader\n", res.stderr


def test_relative_interpreter_and_downloader_fallback(tmp_path: Path) -> None:
    """-P accepts a relative path; where that interpreter is absent the stock downloader runs."""
    stock_tree(tmp_path)
    rel = os.path.relpath(sys.executable)
    assert run_install("-d", str(tmp_path), "-P", rel).returncode == 0
    wrapper = tmp_path / "var/remotes/datastore/downloader.sh"
    assert f'"{sys.executable}"' in wrapper.read_text()
    moved = wrapper.read_text().replace(sys.executable, str(tmp_path / "no/python"))
    wrapper.write_text(moved)  # as on a host that got the remotes through onehost sync
    res = subprocess.run([str(wrapper), "x", "-"], capture_output=True, text=True, timeout=30)
    assert res.stdout == "stock downloader\n"
