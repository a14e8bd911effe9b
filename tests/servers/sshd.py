"""OpenSSH sshd (Debian openssh-server) on a free loopback port, for BRIDGE_LIST tests.

The suite generates a host key and a user key in a temporary folder, runs ``sshd -D`` as the
current user (root in CI, hence ``PermitRootLogin yes``) and writes an ssh_config where several
host aliases (``bridge1``, ``bridge2``) all lead to it. The driver finds that config through
``ONE_MARKET_SSH_CONFIG`` (``ssh -F``), so the user's own ssh setup is never read or changed.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port, need_program, running, start_process, stop_process

ALIASES = ("bridge1", "bridge2")
HOST_KEY_ALIAS = "onemarket-test-sshd"
SSH_CONFIG_ENV = "ONE_MARKET_SSH_CONFIG"

_SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
StrictModes no
UsePAM no
AllowUsers {user}
MaxStartups 50:30:100
MaxSessions 50
LogLevel ERROR
"""

_SSH_CONFIG = """Host {aliases}
    HostName 127.0.0.1
    Port {port}
    User {user}
    IdentityFile {root}/id_ed25519
    IdentitiesOnly yes
    HostKeyAlias {alias}
    UserKnownHostsFile {root}/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    LogLevel ERROR
"""


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "onemarket-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )


@dataclass
class Sshd:
    """One sshd; ``aliases`` are host names usable in BRIDGE_LIST with ``config`` in use."""

    root: Path
    port: int = 0
    aliases: tuple[str, ...] = ALIASES
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.root / "ssh_config"

    def start(self) -> None:
        binary = need_program("sshd", "openssh-server")
        need_program("ssh", "openssh-client")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        _keygen(self.root / "host_ed25519")
        _keygen(self.root / "id_ed25519")
        (self.root / "authorized_keys").write_text((self.root / "id_ed25519.pub").read_text())
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        (self.root / "known_hosts").write_text(f"{HOST_KEY_ALIAS} {host_pub[0]} {host_pub[1]}\n")
        self.port = free_port()
        user = getpass.getuser()
        (self.root / "sshd_config").write_text(
            _SSHD_CONFIG.format(port=self.port, root=self.root, user=user)
        )
        self.config.write_text(
            _SSH_CONFIG.format(
                aliases=" ".join(self.aliases),
                port=self.port,
                user=user,
                root=self.root,
                alias=HOST_KEY_ALIAS,
            )
        )
        self.proc = start_process(
            [binary, "-D", "-e", "-f", str(self.root / "sshd_config")],
            log=self.root / "sshd.log",
            port=self.port,
            what="sshd",
        )

    def session_pids(self) -> list[int]:
        """Processes serving connections: children of the listening sshd."""
        if self.proc is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and int(fields[1]) == self.proc.pid:
                pids.append(int(entry.name))
        return pids

    def kill_sessions(self) -> int:
        """Cut every open connection (the listener stays up); how many were cut."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        self.kill_sessions()
        stop_process(self.proc)
        self.proc = None


@pytest.fixture
def sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sshd]:
    """A running sshd; ``ONE_MARKET_SSH_CONFIG`` points the driver's ssh at it."""
    with running(Sshd(root=tmp_path / "sshd")) as server:
        monkeypatch.setenv(SSH_CONFIG_ENV, str(server.config))
        yield server
