"""Context packages: which one a distribution gets, where it is found, the three formats read
without a package manager, services enabled as systemctl/rc-update would."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import requests
from onemarket import contextpkg as cp
from onemarket.errors import ConfigError, SourceError

TIMEOUTS = (5.0, 10.0)
UNIT = b"[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target network.target\n"


@pytest.mark.parametrize(
    ("distro", "release", "suffix"),
    [
        ("ubuntu", "noble", "deb"),
        ("debian", "bookworm", "deb"),
        ("devuan", "daedalus", "deb"),
        ("alpine", "3.19", "apk"),
        ("almalinux", "8", "el8.noarch.rpm"),
        ("rockylinux", "9", "el9.noarch.rpm"),
        ("oracle", "9", "el9.noarch.rpm"),
        ("centos", "9-Stream", "el9.noarch.rpm"),
        ("fedora", "40", "el8.noarch.rpm"),
        ("fedora", "41", "el9.noarch.rpm"),
        ("amazonlinux", "2023", "el9.noarch.rpm"),
        ("opensuse", "15.6", "suse.noarch.rpm"),
        ("archlinux", "current", None),
        ("almalinux", "10", None),
    ],
)
def test_package_per_distribution(distro: str, release: str, suffix: str | None) -> None:
    family = cp.family_for(distro, release)
    assert (family.suffix if family else None) == suffix


def test_newest_one_context_package_is_chosen() -> None:
    names = {
        n: n
        for n in (
            "one-context_6.8.0-1.deb",
            "one-context_6.10.0-1.deb",
            "one-context-6.10.0-1.el9.noarch.rpm",
            "one-context-6.10.0-1.el8.noarch.rpm",
            "one-context-6.10.0-r1.apk",
            "other_9.deb",
        )
    }
    assert cp.choose(names, cp.DEB) == "one-context_6.10.0-1.deb"
    assert cp.choose(names, cp.EL9) == "one-context-6.10.0-1.el9.noarch.rpm"
    assert cp.choose(names, cp.APK) == "one-context-6.10.0-r1.apk"
    assert cp.choose(names, cp.SUSE) is None


def tar_bytes(members: list[tuple[str, bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_apk() -> bytes:
    control = tar_bytes(
        [(".PKGINFO", b"pkgname = one-context\ndepend = bash\ndepend = ruby\n", 0o644)]
    )
    data = tar_bytes(
        [
            ("etc/init.d/one-context", b"#!/sbin/openrc-run\n", 0o755),
            ("usr/sbin/one-contextd", b"#!/bin/bash\n", 0o755),
        ]
    )
    return gzip.compress(control) + gzip.compress(data)


def fake_rpm() -> bytes:
    """Lead, signature header, main header with REQUIRENAME, gzip cpio (newc) payload."""

    def header(entries: list[tuple[int, int, bytes, int]]) -> bytes:
        store = b""
        index = b""
        for tag, kind, value, count in entries:
            index += b"".join(x.to_bytes(4, "big") for x in (tag, kind, len(store), count))
            store += value
        return (
            b"\x8e\xad\xe8\x01\0\0\0\0"
            + len(entries).to_bytes(4, "big")
            + len(store).to_bytes(4, "big")
            + index
            + store
        )

    def cpio(name: str, mode: int, data: bytes) -> bytes:
        raw = name.encode() + b"\0"
        fields = [1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + raw
        head += b"\0" * ((4 - len(head) % 4) % 4)
        return head + data + b"\0" * ((4 - len(data) % 4) % 4)

    signature = header([(1000, 7, b"\0" * 16, 16)])
    signature += b"\0" * ((8 - len(signature) % 8) % 8)
    main = header([(1049, 8, b"bash\0rpmlib(PayloadIsXz)\0/bin/sh\0", 3)])
    payload = (
        cpio("./usr/lib/systemd/system/one-context.service", 0o100644, UNIT)
        + cpio("./usr/sbin", 0o040755, b"")
        + cpio("./usr/sbin/one-contextd", 0o100755, b"#!/bin/bash\n")
        + cpio("TRAILER!!!", 0, b"")
    )
    lead = b"\xed\xab\xee\xdb" + b"\0" * 92
    return lead + signature + main + gzip.compress(payload)


def test_apk_files_depends_and_openrc_service() -> None:
    members, depends = cp.read_apk(fake_apk())
    assert [m.name for m, _ in members] == ["etc/init.d/one-context", "usr/sbin/one-contextd"]
    assert depends == ["bash", "ruby"]
    links = cp.enable_services(members, "apk")
    assert [(m.name, m.linkname) for m, _ in links] == [
        ("etc/runlevels/default/one-context", "/etc/init.d/one-context")
    ]


def test_rpm_files_requires_and_systemd_links() -> None:
    members, depends = cp.read_rpm(fake_rpm())
    names = {m.name: (m.mode, body) for m, body in members}
    assert names["./usr/sbin/one-contextd"] == (0o755, b"#!/bin/bash\n")
    assert depends == ["bash"]
    links = {m.name: m.linkname for m, _ in cp.enable_services(members, "rpm")}
    assert links == {
        "etc/systemd/system/multi-user.target.wants/one-context.service": (
            "/usr/lib/systemd/system/one-context.service"
        ),
        "etc/systemd/system/network.target.wants/one-context.service": (
            "/usr/lib/systemd/system/one-context.service"
        ),
    }


@pytest.mark.parametrize("reader", [cp.read_deb, cp.read_apk, cp.read_rpm])
def test_not_a_package(reader: Any) -> None:
    with pytest.raises(SourceError):
        reader(b"<html>not found</html>")


def test_sources_folder_listing_and_release_document(httpd: Any, tmp_path: Path) -> None:
    (tmp_path / "one-context_7.0.0-1.deb").write_bytes(b"x")
    session = requests.Session()
    assert cp.list_candidates(str(tmp_path), session, TIMEOUTS) == {
        "one-context_7.0.0-1.deb": str(tmp_path / "one-context_7.0.0-1.deb")
    }
    httpd.routes["/pkgs/"] = (
        b'<html><a href="../">../</a><a href="one-context_7.0.0-1.deb">x</a>'
        b'<a href="sub/">sub/</a></html>'
    )
    assert cp.list_candidates(f"{httpd.url}/pkgs/", session, TIMEOUTS) == {
        "one-context_7.0.0-1.deb": f"{httpd.url}/pkgs/one-context_7.0.0-1.deb"
    }
    release = {"assets": [{"browser_download_url": "http://127.0.0.1:1/d/one-context-7.apk"}]}
    httpd.routes["/release"] = json.dumps(release).encode()
    assert cp.list_candidates(f"{httpd.url}/release", session, TIMEOUTS) == {
        "one-context-7.apk": "http://127.0.0.1:1/d/one-context-7.apk"
    }
    with pytest.raises(ConfigError, match="neither a folder nor an http"):
        cp.list_candidates(str(tmp_path / "missing"), session, TIMEOUTS)


def test_market_attribute_wins_over_defaultrc() -> None:
    env = {cp.CONTEXT_ENV: "/from/defaultrc"}
    assert cp.configured_source({cp.CONTEXT_ATTR: "/from/market"}, env) == "/from/market"
    assert cp.configured_source({}, env) == "/from/defaultrc"
    assert cp.configured_source({}, {}) == ""  # the GitHub releases API


def test_unsupported_distribution_gets_the_stock_note(tmp_path: Path) -> None:
    overlay = cp.build_overlay(
        "archlinux", "current", {}, {}, requests.Session(), tmp_path, TIMEOUTS
    )
    assert overlay.tar is not None
    with tarfile.open(overlay.tar) as tar:
        note = tar.extractfile(cp.NOT_SUPPORTED_LOG)
        assert note is not None
        assert note.read() == b"archlinux-current is not supported by OpenNebula context\n"


def test_hostile_packages_fail_in_bounded_time_and_memory() -> None:
    # a negative ar member size moved the reader back to where it started: an endless loop
    member = b"debian-binary   " + b"0" * 32 + b"-60".ljust(10) + b"`\n"
    with pytest.raises(SourceError, match="malformed"):
        cp.read_deb(b"!<arch>\n" + member + b"2.0\n")
    # a gzip bomb: ~40 MiB of zeros would unpack to far more than any context package
    bomb = gzip.compress(b"\0" * (cp.MAX_UNPACKED_BYTES + 1024), compresslevel=1)
    with pytest.raises(SourceError, match="unpacks to more than"):
        cp.read_apk(bomb)


def test_package_names_from_a_listing_cannot_reach_the_root_shell() -> None:
    from onemarket import contextroot

    for name in ("/root/one-context$(id).deb", "/root/a b.deb", "/root/../etc/x.deb", "x.deb"):
        with pytest.raises(SourceError, match="unsafe context package name"):
            contextroot.commands("deb", name)
    assert "one-context_6.10.0-1.deb" in contextroot.commands(
        "deb", "/root/one-context_6.10.0-1.deb"
    )
