"""The context package installed by the distribution's package manager, through OpenNebula's
root helper, when (and only when) the stock sudo rule grants it.

The stock ``lxd_downloader.sh`` pipes its chroot commands into
``sudo -n /usr/lib/one/sh/create_container_image.sh TMP_DIR ID EXTENSION TERMINAL`` (sudoers
alias ONE_MARKET of OpenNebula's packages): the helper mounts ``TMP_DIR/ID.raw`` on
``TMP_DIR/ID``, unpacks ``TMP_DIR/ID.EXTENSION`` into it and runs the commands in a chroot. The
same rule is used here, on the disk already built without root: the tarball given to the
helper is empty, and the commands install the package file placed in ``/root`` of the image
with the package manager, which brings its dependencies and runs its scripts. The helper's own
changes to the root folder's owner are undone afterwards.

When the rule is not granted (``sudo -n -l`` says no) nothing of this runs: the caller says in
one WARN what was skipped.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import re
import shutil
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

from . import driverlog
from .errors import SourceError, one_line

HELPER = "sh/create_container_image.sh"
"""The helper under OpenNebula's lib folder (/usr/lib/one, or $ONE_LOCATION/lib)."""
HELPER_ID = "chroot"
"""The ID argument: the helper works on ``<workdir>/chroot.raw`` mounted on ``<workdir>/chroot``."""
SUDO_PROBE_TIMEOUT_S = 30.0
HELPER_TIMEOUT_S = 3600.0
"""Longest package-manager run (updates over a slow mirror included)."""
STOP_GRACE_S = 30.0
"""Wait after SIGTERM for the helper to unmount (its EXIT trap) before SIGKILL."""
RESOLV_CONF = "/etc/resolv.conf"

_INSTALL = {
    "deb": "apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y {pkg}",
    "apk": "apk add --allow-untrusted {pkg}",
    "rpm": "dnf -y install {pkg} || yum -y install {pkg}",
    "suse": "zypper -n --no-gpg-checks install --allow-unsigned-rpm {pkg}",
}
"""Package-manager command installing a local package file with its dependencies."""
_DEVICES = (("null", 1, 3), ("random", 1, 8), ("urandom", 1, 9))
"""Nodes package managers need inside the chroot (no /dev is mounted there); removed after."""


def helper_path(environ: Mapping[str, str]) -> Path:
    loc = environ.get("ONE_LOCATION", "").strip()
    return (Path(loc) / "lib" if loc else Path("/usr/lib/one")) / HELPER


def usable_helper(environ: Mapping[str, str]) -> Path | None:
    """The helper when it is installed and ``sudo -n`` may run it, else None."""
    helper = helper_path(environ)
    sudo = shutil.which("sudo")
    if sudo is None or not helper.is_file():
        return None
    try:
        probe = subprocess.run(
            [sudo, "-n", "-l", str(helper)],
            capture_output=True,
            timeout=SUDO_PROBE_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        driverlog.debug(f"sudo -n -l {helper}: {one_line(probe.stderr.decode(errors='replace'))}")
        return None
    return helper


def _heredoc_safe(text: str) -> str:
    """``text`` unchanged through the helper's unquoted heredoc (it expands ``$`` and ``` ` ```)."""
    return text.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


_SAFE_PACKAGE_PATH_RE = re.compile(r"/[A-Za-z0-9._+~-]+(?:/[A-Za-z0-9._+~-]+)*")
"""What a package's path in the image may be: its name comes from a remote listing, and the
commands run as root through the stock helper's (expanding) heredoc."""


def commands(kind: str, package_in_image: str) -> str:
    """The chroot commands: DNS of the front-end, device nodes, install, clean up. No shell
    variables: the helper pastes them into an unquoted heredoc, which would expand them."""
    if ".." in package_in_image.split("/") or not _SAFE_PACKAGE_PATH_RE.fullmatch(package_in_image):
        raise SourceError(f"unsafe context package name {one_line(package_in_image, 80)!r}")
    try:
        dns = Path(RESOLV_CONF).read_text(encoding="utf-8", errors="replace")
    except OSError:
        dns = "nameserver 127.0.0.1\n"
    made = "/root/.one-market-devices"
    lines = [
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "rm -f /etc/resolv.conf",
        "cat > /etc/resolv.conf <<'ONE_MARKET_DNS'",
        _heredoc_safe(dns.rstrip("\n")),
        "ONE_MARKET_DNS",
    ]
    for name, major, minor in _DEVICES:
        lines.append(
            f"[ -e /dev/{name} ] || {{ mknod -m 666 /dev/{name} c {major} {minor} && "
            f"echo /dev/{name} >> {made}; }}"
        )
    lines.append(
        f"{_INSTALL[kind].format(pkg=package_in_image)} >/var/log/one-market-context.log 2>&1 "
        "|| echo 'one-market: the package manager failed, see /var/log/one-market-context.log "
        "in the image' >&2"
    )
    lines.append(f"rm -f {package_in_image}")
    lines.append(f"[ -f {made} ] && xargs rm -f < {made}; rm -f {made}")
    return "\n".join(lines) + "\n"


def _empty_tar_xz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ)


def run_helper(
    helper: Path, raw: Path, workdir: Path, script: str, terminal: str, what: str
) -> str | None:
    """Run the helper on ``raw`` (moved to the helper's layout and back); the failure's last
    line, or None when it succeeded."""
    image = workdir / f"{HELPER_ID}.raw"
    raw.rename(image)
    (workdir / f"{HELPER_ID}.tar.xz").write_bytes(_empty_tar_xz())
    (workdir / HELPER_ID).mkdir(exist_ok=True)
    argv = [
        shutil.which("sudo") or "sudo",
        "-n",
        str(helper),
        str(workdir),
        HELPER_ID,
        "tar.xz",
        terminal,
    ]
    driverlog.info(f"{what}: installing the context package with the package manager ({helper})")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        image.rename(raw)
        return f"cannot run sudo: {exc.strerror or exc}"
    try:
        _out, err = proc.communicate(script, timeout=HELPER_TIMEOUT_S)
    except BaseException:
        # SIGTERM reaches the helper through sudo, so its EXIT trap unmounts the image
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        with contextlib.suppress(OSError):
            image.rename(raw)
    problems = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
    if proc.returncode != 0 or any("one-market:" in p for p in problems):
        return one_line(problems[-1] if problems else f"exit {proc.returncode}", 300)
    return None
