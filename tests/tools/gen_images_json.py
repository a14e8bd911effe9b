#!/usr/bin/env python3
# Vendored copy of our organisation's tools/gen_images_json.py (shared tools folder),
# kept as-is apart from formatting so tests never depend on files outside the repository.
# ruff: noqa
"""Generate a realistic images.linuxcontainers.org simplestreams catalog.

Writes <out>/streams/v1/index.json and <out>/streams/v1/images.json in the
exact shape the Linux Containers image server publishes (see ../reference/linuxcontainers-simplestreams.md
for the sources of every field), plus the LXC "download
template" index <out>/meta/1.0/index-system.

Two modes:

* default (synthetic): several hundred products, 2-3 versions each, with
  realistic sizes and deterministic, fake-but-well-formed sha256 values.
  Nothing but the JSON is written.  Byte-for-byte deterministic for a seed.

* --real-bytes: every item's "path" points at a small real file written
  under <out>/images/...: a genuine rootfs.tar.xz (tiny directory tree),
  incus.tar.xz / lxd.tar.xz metadata tarball (metadata.yaml + templates),
  rootfs.squashfs (if mksquashfs exists), disk.qcow2 (GPT + ext4 root made
  from the same tree, converted with qemu-img if present, else a pure-Python
  qcow2 writer), squashfs.vcdiff deltas (if xdelta3 exists) and SHA256SUMS.
  sha256/size/combined_* are computed from the real bytes, so a client can
  download and verify them from a local web server:

      python3 gen_images_json.py --real-bytes --only 'ubuntu:jammy|alpine:3.19' -o /tmp/lxcsrv
      python3 -m http.server -d /tmp/lxcsrv -b 127.0.0.1 8000

Profiles (product matrices taken from lxc/lxc-ci jenkins/jobs/image-*.yaml
at the given date; item layout from the era):

  2023   lxc-ci @2023-05-01, pre-Incus: metadata item "lxd.tar.xz" only,
         "lxd_requirements" (only when non-empty); arches incl. armel, armhf,
         i386, ppc64el, s390x.
  2024   lxc-ci @2024-01-10: "incus.tar.xz" + legacy "lxd.tar.xz" items,
         "requirements" always present; amd64/arm64 only.
  2025   lxc-ci @2025-01-10: as 2024 + armhf/riscv64 for alpine, debian,
         ubuntu; + cdrom_agent requirement.
  mixed  (default, SYNTHETIC) the 2025 format and releases, but each distro
         gets the union of its 2023 and 2025 architectures (so one file has
         amd64, arm64, armhf, riscv64, i386, ppc64el, s390x), nixos included.
"""

import argparse
import datetime as dt
import hashlib
import io
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile

# --------------------------------------------------------------------------
# Matrices.  Each entry: releases, arches, variants, vm_arches.
# vm_arches: arches where the job builds TYPE="container,vm" (disk.qcow2).
# "desktop*" variants are VM-only (TYPE="vm").
# --------------------------------------------------------------------------
A64 = ("amd64",)
A64ARM = ("amd64", "arm64")

MATRIX = {
    "2023": {
        "almalinux": (["8", "9"], ["amd64", "arm64", "ppc64el"], ["default", "cloud"], A64),
        "alpine": (
            ["3.14", "3.15", "3.16", "3.17", "edge"],
            ["amd64", "arm64", "armhf", "i386", "ppc64el", "s390x"],
            ["default", "cloud"],
            A64ARM,
        ),
        "archlinux": (
            ["current"],
            ["amd64", "armhf", "arm64"],
            ["default", "cloud", "desktop-gnome"],
            A64,
        ),
        "centos": (
            ["7", "8-Stream", "9-Stream"],
            ["amd64", "arm64", "armhf", "i386", "ppc64el"],
            ["default", "cloud"],
            A64,
        ),
        "debian": (
            ["buster", "bullseye", "bookworm", "sid"],
            ["amd64", "arm64", "armel", "armhf", "i386", "ppc64el", "s390x"],
            ["default", "cloud"],
            A64ARM,
        ),
        "devuan": (
            ["beowulf", "chimaera"],
            ["amd64", "arm64", "armel", "armhf", "i386", "ppc64el"],
            ["default", "cloud"],
            (),
        ),
        "fedora": (
            ["36", "37", "38"],
            ["amd64", "arm64", "ppc64el", "s390x"],
            ["default", "cloud"],
            A64ARM,
        ),
        "gentoo": (["current"], ["amd64", "armhf", "arm64", "ppc64el"], ["openrc", "systemd"], A64),
        "kali": (["current"], ["amd64", "arm64", "armel", "armhf"], ["default", "cloud"], ()),
        "mint": (
            ["ulyana", "ulyssa", "uma", "una", "vanessa", "vera"],
            ["amd64"],
            ["default", "cloud"],
            (),
        ),
        "openeuler": (
            ["20.03", "22.03", "22.09", "23.03"],
            ["amd64", "arm64"],
            ["default", "cloud"],
            A64,
        ),
        "opensuse": (
            ["15.4", "tumbleweed"],
            ["amd64", "arm64", "ppc64el", "s390x"],
            ["default", "cloud", "desktop-kde"],
            A64ARM,
        ),
        "oracle": (["7", "8", "9"], ["amd64", "arm64"], ["default", "cloud"], ()),
        "rockylinux": (["8", "9"], ["amd64", "arm64", "ppc64el"], ["default", "cloud"], A64),
        "ubuntu": (
            ["xenial", "bionic", "focal", "jammy", "kinetic", "lunar"],
            ["amd64", "arm64", "armhf", "i386", "ppc64el", "s390x"],
            ["default", "cloud", "desktop"],
            A64ARM,
        ),
        "voidlinux": (["current"], ["amd64", "arm64", "armhf"], ["default", "musl"], ()),
    },
    "2024": {
        "almalinux": (["8", "9"], list(A64ARM), ["default", "cloud"], A64),
        "alpine": (
            ["3.16", "3.17", "3.18", "3.19", "edge"],
            list(A64ARM),
            ["default", "cloud"],
            A64ARM,
        ),
        "archlinux": (["current"], list(A64ARM), ["default", "cloud", "desktop-gnome"], A64),
        "centos": (["7", "8-Stream", "9-Stream"], list(A64ARM), ["default", "cloud"], A64),
        "debian": (
            ["buster", "bullseye", "bookworm", "trixie", "sid"],
            list(A64ARM),
            ["default", "cloud"],
            A64ARM,
        ),
        "devuan": (["beowulf", "chimaera", "daedalus"], list(A64ARM), ["default", "cloud"], ()),
        "fedora": (["37", "38", "39"], list(A64ARM), ["default", "cloud"], A64ARM),
        "gentoo": (["current"], list(A64ARM), ["openrc", "systemd"], A64),
        "kali": (["current"], list(A64ARM), ["default", "cloud"], ()),
        "mint": (
            ["ulyana", "ulyssa", "uma", "una", "vanessa", "vera", "victoria"],
            ["amd64"],
            ["default", "cloud"],
            (),
        ),
        "nixos": (["23.11", "unstable"], list(A64ARM), ["default"], ()),
        "openeuler": (["20.03", "22.03", "23.03"], list(A64ARM), ["default", "cloud"], A64),
        "opensuse": (
            ["15.4", "15.5", "tumbleweed"],
            list(A64ARM),
            ["default", "cloud", "desktop-kde"],
            A64ARM,
        ),
        "oracle": (["7", "8", "9"], list(A64ARM), ["default", "cloud"], ()),
        "rockylinux": (["8", "9"], list(A64ARM), ["default", "cloud"], A64),
        "ubuntu": (
            ["xenial", "bionic", "focal", "jammy", "lunar", "mantic"],
            list(A64ARM),
            ["default", "cloud", "desktop"],
            A64ARM,
        ),
        "voidlinux": (["current"], list(A64ARM), ["default", "musl"], ()),
    },
    "2025": {
        "almalinux": (["8", "9"], list(A64ARM), ["default", "cloud"], A64),
        "alpine": (
            ["3.18", "3.19", "3.20", "3.21", "edge"],
            ["amd64", "arm64", "armhf", "riscv64"],
            ["default", "cloud"],
            A64ARM,
        ),
        "archlinux": (["current"], list(A64ARM), ["default", "cloud", "desktop-gnome"], A64),
        "centos": (["9-Stream"], list(A64ARM), ["default", "cloud"], A64),
        "debian": (
            ["buster", "bullseye", "bookworm", "trixie"],
            ["amd64", "arm64", "armhf", "riscv64"],
            ["default", "cloud"],
            A64ARM,
        ),
        "devuan": (["beowulf", "chimaera", "daedalus"], list(A64ARM), ["default", "cloud"], ()),
        "fedora": (["39", "40", "41"], list(A64ARM), ["default", "cloud"], A64ARM),
        "gentoo": (["current"], list(A64ARM), ["openrc", "systemd"], A64),
        "kali": (["current"], list(A64ARM), ["default", "cloud"], ()),
        "mint": (
            ["ulyana", "ulyssa", "uma", "una", "vanessa", "vera", "victoria", "virginia", "wilma"],
            ["amd64"],
            ["default", "cloud"],
            (),
        ),
        "nixos": (["24.05", "24.11", "unstable"], list(A64ARM), ["default"], ()),
        "openeuler": (
            ["20.03", "22.03", "24.03", "24.09"],
            list(A64ARM),
            ["default", "cloud"],
            A64,
        ),
        "opensuse": (
            ["15.5", "15.6", "tumbleweed"],
            list(A64ARM),
            ["default", "cloud", "desktop-kde"],
            A64ARM,
        ),
        "oracle": (["7", "8", "9"], list(A64ARM), ["default", "cloud"], ()),
        "rockylinux": (["8", "9"], list(A64ARM), ["default", "cloud"], A64),
        "ubuntu": (
            ["focal", "jammy", "noble", "oracular"],
            ["amd64", "arm64", "armhf", "riscv64"],
            ["default", "cloud", "desktop"],
            A64ARM,
        ),
        "voidlinux": (["current"], list(A64ARM), ["default", "musl"], ()),
    },
}


def _mixed():
    out = {}
    for d, (rel, arches, var, vm) in MATRIX["2025"].items():
        old = MATRIX["2023"].get(d, ([], [], [], ()))[1]
        merged = [
            a
            for a in ["amd64", "arm64", "armhf", "riscv64", "i386", "ppc64el", "s390x"]
            if a in arches or a in old
        ]
        out[d] = (rel, merged, var, vm)
    return out


MATRIX["mixed"] = _mixed()

PROFILE_END = {"2023": "20230501", "2024": "20240110", "2025": "20250110", "mixed": "20250110"}


def combination_ok(profile, d, rel, arch, var):
    """combination-filter expressions of the jenkins jobs (+ obvious ones)."""
    if var.startswith("desktop") and arch != "amd64":
        return False
    if d == "archlinux" and arch != "amd64" and var == "cloud":
        return False
    if d == "ubuntu" and var == "desktop" and rel in ("xenial", "bionic"):
        return False
    if d == "ubuntu" and arch == "i386" and rel not in ("xenial", "bionic"):
        return False  # Ubuntu has no i386 images after bionic
    if d == "alpine" and var == "cloud" and arch == "s390x":
        return False
    if d == "alpine" and rel == "edge" and arch == "i386":
        return False
    if d == "centos" and arch == "armhf" and rel != "7":
        return False
    if d == "centos" and arch == "i386" and rel != "7":
        return False
    if d == "rockylinux" and arch == "ppc64el" and rel != "9":
        return False
    if d == "opensuse" and arch == "s390x" and var == "cloud" and rel == "tumbleweed":
        return False
    if d == "opensuse" and profile in ("2025", "mixed") and rel == "15.5" and var == "cloud":
        return False
    if (
        d == "alpine"
        and arch == "riscv64"
        and rel in ("3.14", "3.15", "3.16", "3.17", "3.18", "3.19")
    ):
        return False
    if d == "debian" and arch == "riscv64" and rel != "trixie":
        return False
    if d == "debian" and arch == "armhf" and rel == "trixie" and profile != "2023":
        return False
    if d == "ubuntu" and arch == "riscv64" and rel == "focal":
        return False
    return True


# jenkins-import-images ALIASES (extended with the releases of older eras)
ALIASES = {
    "debian/stretch": ["debian/9"],
    "debian/buster": ["debian/10"],
    "debian/bullseye": ["debian/11"],
    "debian/bookworm": ["debian/12"],
    "debian/trixie": ["debian/13"],
    "debian/forky": ["debian/14"],
    "ubuntu/xenial": ["ubuntu/16.04"],
    "ubuntu/bionic": ["ubuntu/18.04"],
    "ubuntu/focal": ["ubuntu/20.04"],
    "ubuntu/jammy": ["ubuntu/22.04"],
    "ubuntu/kinetic": ["ubuntu/22.10"],
    "ubuntu/lunar": ["ubuntu/23.04"],
    "ubuntu/mantic": ["ubuntu/23.10"],
    "ubuntu/noble": ["ubuntu/24.04"],
    "ubuntu/oracular": ["ubuntu/24.10"],
    "ubuntu/plucky": ["ubuntu/25.04"],
}
REQUIRE_CGROUP1 = ["centos/7", "oracle/7", "springdalelinux/7"]
REQUIRE_CGROUP2 = ["ubuntu/24.04"]
REQUIRE_CDROM_AGENT = [
    "almalinux",
    "centos",
    "openeuler",
    "oracle",
    "rockylinux",
    "springdalelinux",
]
REQUIRE_NO_SECUREBOOT = ["alpine", "archlinux", "debian/9", "gentoo", "nixos", "openeuler"]

# Approximate rootfs.tar.xz size in MB for the default variant on amd64.
BASE_MB = {
    "almalinux": 118,
    "alpine": 2.9,
    "archlinux": 175,
    "centos": 128,
    "debian": 96,
    "devuan": 88,
    "fedora": 108,
    "gentoo": 255,
    "kali": 125,
    "mint": 228,
    "nixos": 150,
    "openeuler": 122,
    "opensuse": 76,
    "oracle": 121,
    "rockylinux": 119,
    "ubuntu": 104,
    "voidlinux": 68,
}
ARCH_F = {
    "amd64": 1.0,
    "arm64": 0.96,
    "armhf": 0.88,
    "armel": 0.86,
    "i386": 0.93,
    "ppc64el": 1.07,
    "s390x": 1.02,
    "riscv64": 0.98,
}
VARIANT_F = {
    "default": 1.0,
    "cloud": 1.28,
    "openrc": 1.0,
    "systemd": 1.12,
    "musl": 0.9,
    "desktop": 9.0,
    "desktop-gnome": 7.5,
    "desktop-kde": 8.0,
}
QCOW_F = {"default": 2.9, "cloud": 2.6}

OS_RELEASE = {
    "ubuntu": ("ubuntu", "Ubuntu"),
    "debian": ("debian", "Debian GNU/Linux"),
    "alpine": ("alpine", "Alpine Linux"),
    "almalinux": ("almalinux", "AlmaLinux"),
    "archlinux": ("arch", "Arch Linux"),
    "centos": ("centos", "CentOS Stream"),
    "devuan": ("devuan", "Devuan GNU/Linux"),
    "fedora": ("fedora", "Fedora Linux"),
    "gentoo": ("gentoo", "Gentoo"),
    "kali": ("kali", "Kali GNU/Linux"),
    "mint": ("linuxmint", "Linux Mint"),
    "nixos": ("nixos", "NixOS"),
    "openeuler": ("openEuler", "openEuler"),
    "opensuse": ("opensuse", "openSUSE"),
    "oracle": ("ol", "Oracle Linux Server"),
    "rockylinux": ("rocky", "Rocky Linux"),
    "voidlinux": ("void", "Void"),
}
KERNEL_ARCH = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "armhf": "armv7l",
    "armel": "armv7l",
    "i386": "i686",
    "ppc64el": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


# --------------------------------------------------------------------------
def fake_sha(*parts):
    return hashlib.sha256(("\0".join(str(p) for p in parts)).encode()).hexdigest()


def sha256_bytes(*blobs):
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    return h.hexdigest()


def aliases_for(d, rel, var):
    al = ["%s/%s/%s" % (d, rel, var)]
    extra = ALIASES.get("%s/%s" % (d, rel), [])
    for a in extra:
        al.append("%s/%s" % (a, var))
    if var == "default":
        al.append("%s/%s" % (d, rel))
        al.extend(extra)
    if rel == "current":
        al.append(d if var == "default" else "%s/%s" % (d, var))
    return al


def requirements_for(profile, aliases, var):
    req = {}
    for alias in aliases:
        if any(alias.startswith(e) for e in REQUIRE_CGROUP1):
            req["cgroup"] = "v1"
        if any(alias.startswith(e) for e in REQUIRE_CGROUP2):
            req["cgroup"] = "v2"
        if any(alias.startswith(e) for e in REQUIRE_NO_SECUREBOOT):
            req["secureboot"] = "false"
        if profile in ("2025", "mixed") and any(alias.startswith(e) for e in REQUIRE_CDROM_AGENT):
            req["cdrom_agent"] = "true"
    return req


def serial_list(rng, end, n, base_hm):
    """n build serials (oldest first), daily-ish, ending at or before `end`."""
    day = dt.datetime.strptime(end, "%Y%m%d") - dt.timedelta(days=rng.choice([0, 0, 0, 1]))
    out = []
    for _ in range(n):
        m = base_hm + rng.randint(-6, 25)
        t = day + dt.timedelta(minutes=m)
        out.append(t.strftime("%Y%m%d_%H:%M"))
        day -= dt.timedelta(days=rng.choice([1, 1, 1, 1, 2, 3, 7]))
    return sorted(set(out))


# --------------------------------------------------------------------------
# Real bytes
# --------------------------------------------------------------------------
def serial_epoch(serial):
    return int(
        dt.datetime.strptime(serial, "%Y%m%d_%H:%M").replace(tzinfo=dt.timezone.utc).timestamp()
    )


def make_tree(root, d, rel, arch, var, serial):
    os_id, os_name = OS_RELEASE.get(d, (d, d.title()))
    files = {
        "etc/os-release": 'NAME="%s"\nID=%s\nVERSION_ID="%s"\nPRETTY_NAME="%s %s"\n'
        'HOME_URL="https://linuxcontainers.org/"\n' % (os_name, os_id, rel, os_name, rel),
        "etc/hostname": "LXC_NAME\n",
        "etc/hosts": "127.0.0.1   localhost\n127.0.1.1   LXC_NAME\n::1         localhost ip6-localhost ip6-loopback\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": "root:x:0:\n",
        "etc/shadow": "root:*:19000:0:99999:7:::\n",
        "etc/lxc-image": "distribution=%s\nrelease=%s\narchitecture=%s\nvariant=%s\nserial=%s\n"
        % (d, rel, arch, var, serial),
        "usr/bin/hello": "#!/bin/sh\necho 'hello from %s %s %s (%s)'\n" % (d, rel, arch, serial),
        "usr/sbin/init": "#!/bin/sh\nexec /bin/sh\n",
        "root/.profile": "PS1='# '\n",
    }
    dirs = [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var/log",
        "var/lib",
        "usr/lib",
        "home",
        "mnt",
        "opt",
        "srv",
    ]
    for x in dirs:
        os.makedirs(os.path.join(root, x), exist_ok=True)
    for path, content in files.items():
        p = os.path.join(root, path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(content)
        os.chmod(
            p,
            0o755
            if "/bin/" in "/" + path or "/sbin/" in "/" + path
            else (0o640 if path.endswith("shadow") else 0o644),
        )
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "root"), 0o700)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        os.symlink(target, os.path.join(root, link))


def tar_xz(srcdir, mtime, prefix="./", top_entry=True):
    """Deterministic tar.xz of srcdir (entries './x' like tar -C dir -c .)."""
    buf = io.BytesIO()
    entries = []
    for cur, dnames, fnames in os.walk(srcdir):
        dnames.sort()
        for n in sorted(dnames + fnames):
            entries.append(os.path.relpath(os.path.join(cur, n), srcdir))
    entries.sort()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        names = (["."] if top_entry else []) + entries
        for rel in names:
            full = os.path.join(srcdir, rel)
            ti = tf.gettarinfo(
                full, arcname=(prefix if rel == "." else prefix + rel) if prefix else rel
            )
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mtime = mtime
            if ti.isreg():
                with open(full, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)


def make_meta_tarball(d, rel, arch, var, serial, vm):
    epoch = serial_epoch(serial)
    os_name = d.title()
    md = (
        "architecture: %s\n"
        "creation_date: %d\n"
        "expiry_date: %d\n"
        "properties:\n"
        "  architecture: %s\n"
        "  description: %s %s %s (%s)\n"
        "  name: %s-%s-%s-%s-%s\n"
        "  os: %s\n"
        "  release: %s\n"
        '  serial: "%s"\n'
        "  type: %s\n"
        "  variant: %s\n"
        "templates:\n"
        "  /etc/hostname:\n"
        "    when:\n    - create\n    - copy\n"
        "    create_only: false\n    template: hostname.tpl\n    properties: {}\n"
        "  /etc/hosts:\n"
        "    when:\n    - create\n    - copy\n"
        "    create_only: false\n    template: hosts.tpl\n    properties: {}\n"
    ) % (
        KERNEL_ARCH.get(arch, arch),
        epoch,
        epoch + 30 * 86400,
        arch,
        os_name,
        rel,
        arch,
        serial,
        d,
        rel,
        arch,
        var,
        serial,
        os_name,
        rel,
        serial,
        "squashfs" if not vm else "disk-kvm.img",
        var,
    )
    with tempfile.TemporaryDirectory() as t:
        with open(os.path.join(t, "metadata.yaml"), "w") as f:
            f.write(md)
        os.makedirs(os.path.join(t, "templates"))
        with open(os.path.join(t, "templates", "hostname.tpl"), "w") as f:
            f.write("{{ instance.name }}\n")
        with open(os.path.join(t, "templates", "hosts.tpl"), "w") as f:
            f.write("127.0.0.1   localhost\n127.0.1.1   {{ instance.name }}\n")
        for p in ("metadata.yaml", "templates/hostname.tpl", "templates/hosts.tpl"):
            os.chmod(os.path.join(t, p), 0o644)
        return tar_xz(t, epoch, prefix="", top_entry=False)


def make_squashfs(tree, out, epoch):
    exe = shutil.which("mksquashfs")
    if not exe:
        return False
    subprocess.run(
        [
            exe,
            tree,
            out,
            "-noappend",
            "-all-root",
            "-comp",
            "xz",
            "-no-progress",
            "-quiet",
            "-processors",
            "1",
            "-mkfs-time",
            str(epoch),
            "-all-time",
            str(epoch),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return True


def uuid_from(*parts):
    h = fake_sha("uuid", *parts)
    return "%s-%s-4%s-8%s-%s" % (h[0:8], h[8:12], h[13:16], h[17:20], h[20:32])


GPT_TYPES = {
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "root-amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "root-arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
}


def write_gpt(f, total_bytes, disk_guid, parts):
    """Write protective MBR + primary/backup GPT. parts: (type, guid, first, last, name)."""
    import uuid
    import zlib

    total = total_bytes // 512
    mbr = bytearray(512)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    entries = bytearray(128 * 128)
    for i, (ptype, pguid, first, last, name) in enumerate(parts):
        entries[i * 128 : (i + 1) * 128] = (
            uuid.UUID(GPT_TYPES[ptype]).bytes_le
            + uuid.UUID(pguid).bytes_le
            + struct.pack("<QQQ", first, last, 0)
            + name.encode("utf-16-le").ljust(72, b"\0")
        )
    ecrc = zlib.crc32(entries) & 0xFFFFFFFF

    def header(cur, backup, ents):
        h = struct.pack(
            "<8sIIIIQQQQ16sQIII",
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            cur,
            backup,
            34,
            total - 34,
            uuid.UUID(disk_guid).bytes_le,
            ents,
            128,
            128,
            ecrc,
        )
        h = h[:16] + struct.pack("<I", zlib.crc32(h) & 0xFFFFFFFF) + h[20:]
        return h.ljust(512, b"\0")

    f.seek(0)
    f.write(bytes(mbr) + header(1, total - 1, 2) + bytes(entries))
    f.seek((total - 33) * 512)
    f.write(bytes(entries) + header(total - 1, 1, total - 33))


def make_raw_disk(tree, raw, epoch, key, arch, size_mib=8):
    """GPT disk (pure Python): p1 ESP (2 MiB, empty), p2 root; ext4 from tree if mke2fs exists."""
    size = size_mib << 20
    start_root = 3 << 20
    end_root = size - (1 << 20)  # leave 1 MiB (covers the backup GPT)
    with open(raw, "wb") as f:
        f.truncate(size)
        write_gpt(
            f,
            size,
            uuid_from(key, "disk"),
            [
                ("esp", uuid_from(key, "p1"), 2048, (start_root >> 9) - 1, "EFI"),
                (
                    {"amd64": "root-amd64", "arm64": "root-arm64"}.get(arch, "linux"),
                    uuid_from(key, "p2"),
                    start_root >> 9,
                    (end_root >> 9) - 1,
                    "rootfs",
                ),
            ],
        )
    mke2fs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mke2fs:
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))
        u = uuid_from(key, "fs")
        fs_img = raw + ".ext4"
        with open(fs_img, "wb") as f:
            f.truncate(end_root - start_root)
        subprocess.run(
            [
                mke2fs,
                "-t",
                "ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-L",
                "rootfs",
                "-U",
                u,
                "-E",
                "hash_seed=%s,root_owner=0:0" % u,
                "-d",
                tree,
                fs_img,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # mke2fs -d copies the source files' ctime/owner: pin them so the image is reproducible
        debugfs = shutil.which("debugfs")
        if debugfs:
            cmds = []
            for cur, dnames, fnames in os.walk(tree):
                for n in sorted(dnames + fnames):
                    rel = "/" + os.path.relpath(os.path.join(cur, n), tree)
                    for fld, val in (
                        ("ctime", "@%d" % epoch),
                        ("atime", "@%d" % epoch),
                        ("mtime", "@%d" % epoch),
                        ("crtime", "@%d" % epoch),
                        ("ctime_extra", "0"),
                        ("atime_extra", "0"),
                        ("mtime_extra", "0"),
                        ("crtime_extra", "0"),
                        ("uid", "0"),
                        ("gid", "0"),
                    ):
                        cmds.append("sif %s %s %s" % (rel, fld, val))
            cf = raw + ".cmds"
            with open(cf, "w") as f:
                f.write("\n".join(cmds) + "\n")
            subprocess.run(
                [debugfs, "-w", "-f", cf, fs_img],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        with open(fs_img, "rb") as src, open(raw, "r+b") as dst:
            dst.seek(start_root)
            dst.write(src.read())
    else:
        with open(raw, "r+b") as f:
            f.seek(start_root)
            f.write(("TINY-ROOTFS %s\n" % key).encode() * 16)


def write_qcow2_py(raw_path, out_path, cluster_bits=12):
    """Minimal valid qcow2 v2 (no compression); only non-zero clusters stored."""
    cs = 1 << cluster_bits
    with open(raw_path, "rb") as f:
        data = f.read()
    size = len(data)
    n_clusters = (size + cs - 1) // cs
    l2_entries = cs // 8
    n_l2 = (n_clusters + l2_entries - 1) // l2_entries
    l1_size = n_l2
    # layout: 0 header, 1 L1, 2 refcount table, 3 refcount block, 4.. L2 tables, then data
    l1_off, rt_off, rb_off = cs, 2 * cs, 3 * cs
    l2_off0 = 4 * cs
    data_off = l2_off0 + n_l2 * cs
    l2 = [0] * (n_l2 * l2_entries)
    chunks = []
    nxt = data_off
    for i in range(n_clusters):
        c = data[i * cs : (i + 1) * cs]
        if c.strip(b"\0"):
            l2[i] = nxt | (1 << 63)
            chunks.append(c.ljust(cs, b"\0"))
            nxt += cs
    total_clusters = nxt // cs
    assert total_clusters <= cs // 2, "image too big for the tiny qcow2 writer"
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        2,
        0,
        0,
        cluster_bits,
        size,
        0,
        l1_size,
        l1_off,
        rt_off,
        1,
        0,
        0,
    )
    out = bytearray(hdr.ljust(cs, b"\0"))
    l1 = b"".join(struct.pack(">Q", (l2_off0 + k * cs) | (1 << 63)) for k in range(n_l2))
    out += l1.ljust(cs, b"\0")
    out += struct.pack(">Q", rb_off).ljust(cs, b"\0")
    out += (struct.pack(">H", 1) * total_clusters).ljust(cs, b"\0")
    for k in range(n_l2):
        out += b"".join(struct.pack(">Q", e) for e in l2[k * l2_entries : (k + 1) * l2_entries])
    for c in chunks:
        out += c
    with open(out_path, "wb") as f:
        f.write(out)


def make_qcow2(raw, out):
    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        subprocess.run(
            [
                qemu_img,
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compat=1.1,cluster_size=4096",
                raw,
                out,
            ],
            check=True,
        )
        return "qemu-img"
    write_qcow2_py(raw, out)
    return "python"


def make_delta(src, dst, out):
    x = shutil.which("xdelta3")
    if not x or not os.path.exists(src):
        return False
    subprocess.run([x, "-e", "-f", "-s", src, dst, out], check=True)
    return True


# --------------------------------------------------------------------------
def build(args):
    profile = args.profile
    rng = random.Random("%s:%s" % (args.seed, profile))
    matrix = MATRIX[profile]
    end = args.end_date or PROFILE_END[profile]
    only = re.compile(args.only) if args.only else None
    legacy_lxd_only = profile == "2023"
    out = args.out
    if args.real_bytes:
        os.makedirs(out, exist_ok=True)
    tools = {
        "qcow2": None,
        "squashfs": bool(shutil.which("mksquashfs")),
        "xdelta3": bool(shutil.which("xdelta3")),
    }

    base_hm = {d: rng.randint(0, 23 * 60) for d in sorted(matrix)}
    products = {}
    index_lines = []
    nprod = 0
    for d in sorted(matrix):
        rels, arches, variants, vm_arches = matrix[d]
        combos = [
            (d, r, a, v)
            for r in rels
            for a in arches
            for v in variants
            if combination_ok(profile, d, r, a, v)
        ]
        # server order: sorted glob of images/<d>/<r>/<a>/<v>
        for _, rel, arch, var in sorted(combos, key=lambda c: "/".join(c)):
            key = "%s:%s:%s:%s" % (d, rel, arch, var)
            prng = random.Random("%s:%s:%s" % (args.seed, profile, key))
            if only and not only.search(key):
                continue
            if args.max_products and nprod >= args.max_products:
                break
            vm_only = var.startswith("desktop")
            has_vm = vm_only or arch in vm_arches
            has_ct = not vm_only
            n = args.versions if prng.random() < 0.85 else max(1, args.versions - 1)
            serials = serial_list(prng, end, n, base_hm[d])
            aliases = aliases_for(d, rel, var)
            req = requirements_for(profile, aliases, var)
            prod = {
                "aliases": ",".join(aliases),
                "arch": arch,
                "os": d.title(),
                "release": rel,
                "release_title": rel,
            }
            if legacy_lxd_only:
                if req:
                    prod["lxd_requirements"] = req
            else:
                prod["requirements"] = req
            prod["variant"] = var
            prod["versions"] = {}
            mb = (
                BASE_MB[d]
                * ARCH_F.get(arch, 1.0)
                * VARIANT_F.get(var, 1.0)
                * prng.uniform(0.97, 1.03)
            )
            prev_serial = None
            # an expired build that the oldest kept version's delta still refers to
            expired = (
                dt.datetime.strptime(serials[0], "%Y%m%d_%H:%M") - dt.timedelta(days=1)
            ).strftime("%Y%m%d_%H:%M")
            for serial in serials:
                vdir = "images/%s/%s/%s/%s/%s" % (d, rel, arch, var, serial)
                meta_name = "lxd.tar.xz" if legacy_lxd_only else "incus.tar.xz"
                files = {}  # name -> (sha, size)
                blobs = {}
                if args.real_bytes:
                    absdir = os.path.join(out, vdir)
                    os.makedirs(absdir, exist_ok=True)
                    epoch = serial_epoch(serial)
                    with tempfile.TemporaryDirectory() as t:
                        tree = os.path.join(t, "rootfs")
                        os.makedirs(tree)
                        make_tree(tree, d, rel, arch, var, serial)
                        meta = make_meta_tarball(d, rel, arch, var, serial, vm_only)
                        blobs[meta_name] = meta
                        if has_ct:
                            blobs["rootfs.tar.xz"] = tar_xz(tree, epoch)
                            sq = os.path.join(t, "rootfs.squashfs")
                            if make_squashfs(tree, sq, epoch):
                                blobs["rootfs.squashfs"] = open(sq, "rb").read()
                        if has_vm:
                            raw = os.path.join(t, "disk.raw")
                            make_raw_disk(tree, raw, epoch, key + serial, arch)
                            q = os.path.join(t, "disk.qcow2")
                            tools["qcow2"] = make_qcow2(raw, q)
                            blobs["disk.qcow2"] = open(q, "rb").read()
                    for name, b in blobs.items():
                        with open(os.path.join(absdir, name), "wb") as f:
                            f.write(b)
                        files[name] = (sha256_bytes(b), len(b))
                    if prev_serial and "rootfs.squashfs" in files:
                        pdir = os.path.join(out, "images", d, rel, arch, var, prev_serial)
                        dname = "delta-%s.vcdiff" % prev_serial
                        if make_delta(
                            os.path.join(pdir, "rootfs.squashfs"),
                            os.path.join(absdir, "rootfs.squashfs"),
                            os.path.join(absdir, dname),
                        ):
                            b = open(os.path.join(absdir, dname), "rb").read()
                            files[dname] = (sha256_bytes(b), len(b))
                    with open(os.path.join(absdir, "SHA256SUMS"), "w") as f:
                        for name in sorted(files):
                            f.write("%s  %s\n" % (files[name][0], name))
                else:
                    meta_size = prng.randint(640, 720) + (40 if has_vm else 0)
                    files[meta_name] = (fake_sha(args.seed, vdir, "meta"), meta_size)
                    jit = prng.uniform(0.985, 1.015)
                    tar_b = int(mb * jit * 1048576)
                    if has_ct:
                        files["rootfs.tar.xz"] = (fake_sha(args.seed, vdir, "tar"), tar_b)
                        files["rootfs.squashfs"] = (
                            fake_sha(args.seed, vdir, "sq"),
                            (int(tar_b * prng.uniform(1.06, 1.14)) // 4096) * 4096,
                        )
                        base = prev_serial or expired
                        if prev_serial or prng.random() < 0.7:
                            files["delta-%s.vcdiff" % base] = (
                                fake_sha(args.seed, vdir, "delta", base),
                                int(tar_b * prng.uniform(0.004, 0.05)),
                            )
                    if has_vm:
                        f = QCOW_F.get(var, 1.0) if not vm_only else 1.0
                        qb = int(
                            mb * 1048576 * (f if not vm_only else 1.0) * prng.uniform(0.95, 1.3)
                        )
                        files["disk.qcow2"] = (
                            fake_sha(args.seed, vdir, "qcow2"),
                            (qb // 512) * 512,
                        )

                def comb(root):
                    if args.real_bytes:
                        return sha256_bytes(blobs[meta_name], blobs[root])
                    return fake_sha("combined", files[meta_name][0], files[root][0])

                items = {}
                m = {
                    "ftype": meta_name,
                    "sha256": files[meta_name][0],
                    "size": files[meta_name][1],
                    "path": "%s/%s" % (vdir, meta_name),
                }
                if "rootfs.tar.xz" in files:
                    m["combined_sha256"] = comb("rootfs.tar.xz")
                    m["combined_rootxz_sha256"] = m["combined_sha256"]
                if "rootfs.squashfs" in files:
                    m["combined_squashfs_sha256"] = comb("rootfs.squashfs")
                if "disk.qcow2" in files:
                    m["combined_disk-kvm-img_sha256"] = comb("disk.qcow2")
                items[meta_name] = m
                if not legacy_lxd_only:
                    items["lxd.tar.xz"] = dict(m, ftype="lxd.tar.xz")  # legacy copy, same path
                if "rootfs.tar.xz" in files:
                    items["root.tar.xz"] = {
                        "ftype": "root.tar.xz",
                        "sha256": files["rootfs.tar.xz"][0],
                        "size": files["rootfs.tar.xz"][1],
                        "path": vdir + "/rootfs.tar.xz",
                    }
                if "rootfs.squashfs" in files:
                    items["root.squashfs"] = {
                        "ftype": "squashfs",
                        "sha256": files["rootfs.squashfs"][0],
                        "size": files["rootfs.squashfs"][1],
                        "path": vdir + "/rootfs.squashfs",
                    }
                if "disk.qcow2" in files:
                    items["disk.qcow2"] = {
                        "ftype": "disk-kvm.img",
                        "sha256": files["disk.qcow2"][0],
                        "size": files["disk.qcow2"][1],
                        "path": vdir + "/disk.qcow2",
                    }
                for name in sorted(files):
                    if (
                        name.startswith("delta-")
                        and name.endswith(".vcdiff")
                        and "qcow2" not in name
                    ):
                        base = name[len("delta-") : -len(".vcdiff")]
                        items["root.%s" % name[len("delta-") :]] = {
                            "ftype": "squashfs.vcdiff",
                            "sha256": files[name][0],
                            "size": files[name][1],
                            "path": "%s/%s" % (vdir, name),
                            "delta_base": base,
                        }
                prod["versions"][serial] = {"items": items}
                prev_serial = serial
            products[key] = prod
            index_lines.append(
                "%s;%s;%s;%s;%s;/images/%s/%s/%s/%s/%s/"
                % (d, rel, arch, var, serials[-1], d, rel, arch, var, serials[-1])
            )
            nprod += 1

    images = {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": products,
    }
    index = {
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": "streams/v1/images.json",
                "format": "products:1.0",
                "products": sorted(products),
            }
        },
        "format": "index:1.0",
    }
    return images, index, index_lines, tools


def dump(obj, pretty):
    return (json.dumps(obj, indent=2) if pretty else json.dumps(obj)) + "\n"


def sign(out_dir, names):
    gpg = shutil.which("gpg")
    if not gpg:
        print("warning: gpg not found, not signing", file=sys.stderr)
        return
    home = tempfile.mkdtemp(prefix="lxcgpg-")
    env = dict(os.environ, GNUPGHOME=home)
    subprocess.run(
        [
            gpg,
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Test LXC image server <lxc@example.invalid>",
            "rsa2048",
            "sign",
            "never",
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ss = os.path.join(out_dir, "streams", "v1")
    for n in names:
        p = os.path.join(ss, n + ".json")
        for extra, target in (
            (["-a", "-b"], p + ".gpg"),
            (["--clearsign"], os.path.join(ss, n + ".sjson")),
        ):
            if os.path.exists(target):
                os.remove(target)
            subprocess.run(
                [gpg, "--batch", "-o", target] + extra + [p],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    with open(os.path.join(out_dir, "keyring.gpg"), "wb") as f:
        f.write(
            subprocess.run([gpg, "--export"], check=True, env=env, stdout=subprocess.PIPE).stdout
        )
    shutil.rmtree(home, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-o", "--out", default="lxc-images-out", help="output directory (default: %(default)s)"
    )
    ap.add_argument("--seed", default="1", help="seed; same seed+profile+args => identical output")
    ap.add_argument("--profile", default="mixed", choices=sorted(MATRIX))
    ap.add_argument(
        "--versions", type=int, default=3, help="versions kept per product (server keeps 3)"
    )
    ap.add_argument("--end-date", help="YYYYMMDD of the newest build (default per profile)")
    ap.add_argument("--only", help="regex on product key (e.g. 'ubuntu:jammy:amd64|alpine')")
    ap.add_argument("--max-products", type=int, default=0)
    ap.add_argument(
        "--real-bytes", action="store_true", help="write real small files under <out>/images"
    )
    ap.add_argument(
        "--sign",
        action="store_true",
        help="also write index/images .sjson (clearsigned) and .json.gpg (armored detached) "
        "with a throwaway key; public key in <out>/keyring.gpg",
    )
    ap.add_argument("--pretty", action="store_true", help="indent JSON (server writes one line)")
    ap.add_argument(
        "--stdout", action="store_true", help="print images.json to stdout, write nothing"
    )
    ap.add_argument(
        "--serve", type=int, metavar="PORT", help="serve <out> on 127.0.0.1:PORT afterwards"
    )
    args = ap.parse_args(argv)

    images, index, index_lines, tools = build(args)
    if args.stdout:
        sys.stdout.write(dump(images, args.pretty))
        return 0
    ss = os.path.join(args.out, "streams", "v1")
    os.makedirs(ss, exist_ok=True)
    with open(os.path.join(ss, "images.json"), "w") as f:
        f.write(dump(images, args.pretty))
    with open(os.path.join(ss, "index.json"), "w") as f:
        f.write(dump(index, args.pretty))
    md = os.path.join(args.out, "meta", "1.0")
    os.makedirs(md, exist_ok=True)
    with open(os.path.join(md, "index-system"), "w") as f:
        f.write("\n".join(index_lines) + "\n")
    if args.sign:
        sign(args.out, ["index", "images"])
    nv = sum(len(p["versions"]) for p in images["products"].values())
    nvm = sum(
        1
        for p in images["products"].values()
        for v in p["versions"].values()
        if "disk.qcow2" in v["items"]
    )
    print(
        "wrote %s: %d products, %d versions (%d with disk.qcow2), profile=%s seed=%s%s"
        % (
            ss,
            len(images["products"]),
            nv,
            nvm,
            args.profile,
            args.seed,
            (
                " real-bytes qcow2=%s squashfs=%s xdelta3=%s"
                % (tools["qcow2"], tools["squashfs"], tools["xdelta3"])
            )
            if args.real_bytes
            else "",
        ),
        file=sys.stderr,
    )
    if args.serve:
        import functools
        import http.server

        h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=args.out)
        print("serving %s on http://127.0.0.1:%d/" % (args.out, args.serve), file=sys.stderr)
        http.server.ThreadingHTTPServer(("127.0.0.1", args.serve), h).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
