"""The rootless container disk builder: hostile tarballs refused, tar and package semantics,
the debugfs metadata pass."""

from __future__ import annotations

import io
import lzma
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from onemarket import containerdisk as cd
from onemarket.errors import ConfigError, SourceError, StorageError

from tests.servers import need_program

MTIME = 1_700_000_000


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    """A tar member and its ``data`` (regular files only), the other attributes set as given."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    data = attrs.pop("data", b"")
    for key, value in attrs.items():
        setattr(info, key, value)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tarball(path: Path, members: list[tuple[str, bytes, dict]]) -> Path:
    """A tar.gz of (name, type, attributes) members; regular files get ``data``."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, attrs in members:
            info, data = member(name, kind, **attrs)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def unpacked(tmp_path: Path, *layers: list[tuple[str, bytes, dict]]) -> cd.Staging:
    staging = cd.Staging(tmp_path / "tree")
    for n, members in enumerate(layers):
        cd.unpack(staging, tarball(tmp_path / f"l{n}.tar.gz", members), f"layer {n}", n > 0)
    return staging


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([("../evil", tarfile.REGTYPE, {"data": b"x"})], "leaves the tree"),
        ([("./a/../../evil", tarfile.REGTYPE, {"data": b"x"})], "leaves the tree"),
        (
            [
                ("./etc", tarfile.SYMTYPE, {"linkname": "/etc"}),
                ("./etc/passwd", tarfile.REGTYPE, {"data": b"x"}),
            ],
            "goes through the symlink 'etc'",
        ),
        ([("./x", tarfile.LNKTYPE, {"linkname": "/etc/passwd"})], "not a file of the tree"),
        ([("./x", tarfile.LNKTYPE, {"linkname": "../../etc/passwd"})], "not a file of the tree"),
    ],
)
def test_hostile_members_are_refused(
    tmp_path: Path, members: list[tuple[str, bytes, dict]], expected: str
) -> None:
    """A tarball cannot write, link or read outside the staging folder."""
    with pytest.raises(SourceError, match=expected):
        unpacked(tmp_path, members)
    outside = [p for p in tmp_path.rglob("*") if p.name in ("evil", "passwd")]
    assert outside == []


def test_absolute_names_stay_in_the_tree(tmp_path: Path) -> None:
    staging = unpacked(tmp_path, [("/abs/file", tarfile.REGTYPE, {"data": b"in"})])
    assert (staging.root / "abs" / "file").read_bytes() == b"in"


def test_later_member_replaces_earlier(tmp_path: Path) -> None:
    """tar semantics: the last member of a name wins, whatever its type."""
    staging = unpacked(
        tmp_path,
        [
            ("./f", tarfile.REGTYPE, {"data": b"old", "mode": 0o644}),
            ("./f", tarfile.SYMTYPE, {"linkname": "target"}),
            ("./d/", tarfile.DIRTYPE, {"mode": 0o755}),
            ("./d/inner", tarfile.REGTYPE, {"data": b"x"}),
            ("./d", tarfile.REGTYPE, {"data": b"now a file"}),
        ],
    )
    assert (staging.root / "f").is_symlink()
    assert (staging.root / "d").read_bytes() == b"now a file"
    assert "d/inner" not in staging.entries


def test_overlay_follows_folder_symlinks_like_a_package_manager(tmp_path: Path) -> None:
    """A package shipping lib/ on a usr-merged rootfs (lib -> usr/lib): the link stays."""
    staging = unpacked(
        tmp_path,
        [
            ("./usr/lib/", tarfile.DIRTYPE, {"mode": 0o755}),
            ("./lib", tarfile.SYMTYPE, {"linkname": "usr/lib"}),
            ("./sbin", tarfile.SYMTYPE, {"linkname": "/usr/sbin"}),
            ("./usr/sbin/", tarfile.DIRTYPE, {"mode": 0o755}),
        ],
        [
            ("./lib/", tarfile.DIRTYPE, {"mode": 0o755}),
            ("./lib/systemd/system/x.service", tarfile.REGTYPE, {"data": b"unit"}),
            ("./sbin/tool", tarfile.REGTYPE, {"data": b"tool", "mode": 0o755}),
        ],
    )
    assert (staging.root / "lib").is_symlink()
    assert (staging.root / "usr/lib/systemd/system/x.service").read_bytes() == b"unit"
    assert (staging.root / "usr/sbin/tool").read_bytes() == b"tool"


def test_overlay_symlink_leaving_the_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="leaves the tree"):
        unpacked(
            tmp_path,
            [("./lib", tarfile.SYMTYPE, {"linkname": "../../../tmp"})],
            [("./lib/x", tarfile.REGTYPE, {"data": b"x"})],
        )


def test_metadata_script_sets_what_the_folder_cannot_hold(tmp_path: Path) -> None:
    staging = unpacked(
        tmp_path,
        [
            ("./", tarfile.DIRTYPE, {"mode": 0o755}),
            ("./dev/", tarfile.DIRTYPE, {"mode": 0o755}),
            ("./dev/null", tarfile.CHRTYPE, {"mode": 0o666, "devmajor": 1, "devminor": 3}),
            ("./ro/", tarfile.DIRTYPE, {"mode": 0o555, "uid": 5, "gid": 6}),
            ("./bin/su", tarfile.REGTYPE, {"mode": 0o4755, "uid": 0, "data": b"x"}),
            ('./odd"name', tarfile.REGTYPE, {"mode": 0o644, "uid": 9, "data": b"x"}),
            (
                "./cap",
                tarfile.REGTYPE,
                {"data": b"x", "pax_headers": {"SCHILY.xattr.user.test": "value"}},
            ),
        ],
    )
    lines, unaddressable = cd.debugfs_script(staging, tmp_path)
    assert unaddressable == 1
    assert 'cd "/dev"' in lines and 'mknod "null" c 1 3' in lines
    assert 'sif "/dev/null" mode 020666' in lines
    assert 'sif "/ro" mode 040555' in lines and 'sif "/ro" uid 5' in lines
    assert any(ln.startswith("ea_set -f ") and ln.endswith('"/cap" user.test') for ln in lines)
    assert not any("odd" in ln for ln in lines)


def test_built_disk_has_the_tree(tmp_path: Path) -> None:
    need_program("mke2fs", "e2fsprogs")
    debugfs = need_program("debugfs", "e2fsprogs")
    layer = [
        ("./", tarfile.DIRTYPE, {"mode": 0o755}),
        ("./ro/", tarfile.DIRTYPE, {"mode": 0o555, "uid": 5, "gid": 6}),
        ("./ro/link", tarfile.SYMTYPE, {"linkname": "/nowhere", "uid": 7, "gid": 8}),
        ("./ro/f", tarfile.REGTYPE, {"mode": 0o2711, "uid": 100000, "gid": 3, "data": b"f"}),
    ]
    staging_dir = tmp_path / "w"
    staging_dir.mkdir()
    built = cd.build(
        [(tarball(tmp_path / "r.tar.gz", layer), "rootfs")],
        cd.DiskSpec(8, "ext4", "raw"),
        staging_dir,
        "test",
    )
    listing = subprocess.run(
        [debugfs, "-R", "ls -l /ro", str(built.raw)], capture_output=True, text=True, check=True
    ).stdout
    rows = {ln.split()[-1]: ln.split()[1:5] for ln in listing.splitlines() if ln.strip()}
    assert rows["link"][0] == f"{stat.S_IFLNK | 0o777:o}" and rows["link"][2:] == ["7", "8"]
    assert rows["f"] == [f"{stat.S_IFREG | 0o2711:o}", "(1)", "100000", "3"]
    assert rows["."][0] == f"{stat.S_IFDIR | 0o555:o}"
    assert not (staging_dir / "tree").exists()


def test_root_owner_is_set_in_one_debugfs_run(tmp_path: Path, monkeypatch) -> None:
    """uid and gid in one run; a failed command is an error although debugfs exits 0."""
    mke2fs = need_program("mke2fs", "e2fsprogs")
    debugfs = need_program("debugfs", "e2fsprogs")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 8 << 20)
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", str(raw)], check=True, capture_output=True)
    runs, real = [], cd._run
    monkeypatch.setattr(cd, "_run", lambda argv, *a: runs.append(argv) or real(argv, *a))
    cd.set_root_owner(raw, 1234, 4321, "test")
    assert len(runs) == 1
    shown = subprocess.run([debugfs, "-R", "stat /", str(raw)], capture_output=True, text=True)
    assert "User:  1234   Group:  4321" in shown.stdout
    with pytest.raises(StorageError, match="could not reset the root folder's owner"):
        cd.set_root_owner(tmp_path / "missing.raw", 0, 0, "test")


@pytest.mark.parametrize("fs", ["xfs", "btrfs", "zfs"])
def test_other_file_systems_refused_before_download(fs: str) -> None:
    with pytest.raises(ConfigError, match=f"filesystem={fs} cannot be built without root"):
        cd.DiskSpec(64, fs, "raw").check()


def test_corrupt_compressed_rootfs_is_one_source_error(tmp_path: Path) -> None:
    """Bytes that pass the catalog's checksum but are no valid tar.xz (a broken build)."""
    bad = tmp_path / "rootfs.tar.xz"
    good = tarball(tmp_path / "g.tar.gz", [("./f", tarfile.REGTYPE, {"data": b"x" * 4096})])
    data = lzma.compress(good.read_bytes())
    bad.write_bytes(data[: len(data) // 2] + b"\0" * 64 + data[len(data) // 2 :])
    with pytest.raises(SourceError, match="not a valid tarball"):
        cd.unpack(cd.Staging(tmp_path / "tree"), bad, "rootfs")


def test_rootfs_without_files_never_becomes_a_disk(tmp_path: Path) -> None:
    """A valid but empty tarball (only folders) is refused: an empty READY image is the bug
    this builder replaces."""
    empty = tarball(tmp_path / "r.tar.gz", [("./etc/", tarfile.DIRTYPE, {"mode": 0o755})])
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(SourceError, match="holds no file"):
        cd.build([(empty, "rootfs")], cd.DiskSpec(8, "ext4", "raw"), work, "test")
    assert not (work / "disk.raw").exists()
