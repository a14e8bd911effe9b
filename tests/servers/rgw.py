"""A throw-away single-node Ceph cluster with a radosgw (S3) on 127.0.0.1, for the S3 tests.

One monitor, one OSD (memstore by default: every byte in OSD RAM, no block file to create, the
fastest start; ``bluestore`` on a sparse file for long runs such as the benchmark), no manager,
and radosgw with the beast frontend. Everything lives in a temporary folder and every daemon is
stopped by the PID it wrote, never by name.

Facts that matter (learnt the hard way, see the comments in ``_conf``): radosgw's built-in
defaults are cephx and ``ms_mon_client mode = secure``, so with ``auth ... = none`` its own
section must say so too, otherwise it waits 300 s for an auth reply; pool size 1 needs
``mon allow pool size one``; deleted data is garbage-collected after 2 hours by default, so gc
is made fast or a long run fills the OSD.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.servers import free_port, need_program, running

START_TIMEOUT_S = 120.0
"""Longest wait for each daemon (radosgw creates its pools on first start: a few seconds)."""
STOP_TIMEOUT_S = 15.0
"""Grace after SIGTERM before SIGKILL."""
COMMAND_TIMEOUT_S = 60.0
"""Bound on every ceph / radosgw-admin command."""
STORE_BYTES = 8 << 30
"""OSD capacity as reported to Ceph. Memstore only uses RAM for bytes actually stored (the S3
tests store about 0.5 GiB at peak, gc included)."""

ACCESS_KEY = "ONEMARKETTESTKEY0001"
SECRET_KEY = "onemarketTestSecret0000000000000000000001"
OTHER_ACCESS_KEY = "ONEMARKETTESTKEY0002"
OTHER_SECRET_KEY = "onemarketTestSecret0000000000000000000002"
NOBUCKETS_ACCESS_KEY = "ONEMARKETTESTKEY0003"
NOBUCKETS_SECRET_KEY = "onemarketTestSecret0000000000000000000003"
USERS = (
    # uid, access key, secret key, max buckets (-1: may not create any)
    ("onemarket", ACCESS_KEY, SECRET_KEY, 1000),
    ("onemarket-other", OTHER_ACCESS_KEY, OTHER_SECRET_KEY, 1000),
    ("onemarket-nobuckets", NOBUCKETS_ACCESS_KEY, NOBUCKETS_SECRET_KEY, -1),
)
"""Users made at start: the tests' own, one without access to its buckets, one who may not
create buckets. Made up front because radosgw-admin waits about 30 s for a radosgw killed by a
crash test (its watch on the control objects lingers until it times out)."""


def _alive(pid: int) -> bool:
    """True when ``pid`` is running and not a zombie (orphans are reaped lazily here)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _is_ceph_daemon(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(name in cmdline for name in (b"ceph-mon", b"ceph-osd", b"radosgw"))


@dataclass
class CephRgw:
    """The cluster: ``start()``, ``stop()``, and radosgw ``kill_rgw()`` / ``start_rgw()``."""

    store: str = "memstore"
    base: Path | None = None
    rgw_port: int = 0
    mon_port: int = 0
    mon_port_v1: int = 0
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    store_bytes: int = STORE_BYTES
    startup_s: float = 0.0
    _owns_base: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    @property
    def conf(self) -> Path:
        assert self.base is not None
        return self.base / "ceph.conf"

    @property
    def run_dir(self) -> Path:
        assert self.base is not None
        return self.base / "run"

    @property
    def log_dir(self) -> Path:
        assert self.base is not None
        return self.base / "log"

    # ---- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="onemarket-rgw-"))
            self._owns_base = True
        for sub in ("run", "log", "mon", "osd", "rgw", "crash"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        ports: set[int] = {p for p in (self.rgw_port, self.mon_port, self.mon_port_v1) if p}
        while len(ports) < 3:
            ports.add(free_port())
        spare = sorted(ports - {self.rgw_port, self.mon_port, self.mon_port_v1})
        self.rgw_port = self.rgw_port or spare.pop()
        self.mon_port = self.mon_port or spare.pop()
        self.mon_port_v1 = self.mon_port_v1 or spare.pop()
        fsid = str(uuid.uuid4())
        self.conf.write_text(self._conf(fsid), encoding="utf-8")
        (self.base / "keyring").write_text("", encoding="utf-8")
        try:
            mon_addr = f"[v2:127.0.0.1:{self.mon_port},v1:127.0.0.1:{self.mon_port_v1}]"
            monmap = str(self.base / "monmap")
            self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, monmap)
            self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", "/dev/null")
            (self.base / "mon" / "keyring").write_text("", encoding="utf-8")
            self._run("ceph-mon", "-i", "a")
            self._wait_pid("mon.a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run("ceph", "--connect-timeout", "30", "osd", "new", osd_uuid).strip()
            if osd_id != "0":
                raise RuntimeError(f"unexpected osd id {osd_id!r}")
            self._run(
                "ceph", "osd", "crush", "add", "osd.0", "1.0", "root=default", "host=localhost"
            )
            self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._run("ceph-osd", "-i", "0")
            self._wait_pid("osd.0")
            self.start_rgw()
            for uid, access, secret, max_buckets in USERS:
                if uid == "onemarket":
                    access, secret = self.access_key, self.secret_key
                self.create_user(uid, access, secret, max_buckets)
        except Exception as exc:
            tails = self.log_tails()
            self.stop(keep=True)
            raise RuntimeError(
                f"Ceph RGW did not start: {exc} (logs kept in {self.base})\n{tails}"
            ) from exc
        self.startup_s = time.monotonic() - t0

    def start_rgw(self) -> None:
        """Start (or restart) radosgw and wait until it answers HTTP."""
        self._run("radosgw", "-n", "client.rgw.a", "--pid-file", str(self.run_dir / "rgw.pid"))
        pid = self._wait_pid("rgw")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                requests.get(self.endpoint, timeout=2)
                return
            except requests.RequestException:
                if not _alive(pid):
                    raise RuntimeError("radosgw exited during start-up") from None
                time.sleep(0.1)
        raise RuntimeError(f"radosgw not answering on {self.endpoint}")

    def rgw_pid(self) -> int | None:
        return self._pid("rgw")

    def kill_rgw(self, sig: int = signal.SIGKILL) -> None:
        """Kill radosgw (by its PID) and wait until it is gone: the crash of the crash tests."""
        pid = self._pid("rgw")
        if pid is None or not _is_ceph_daemon(pid):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.run_dir / "rgw.pid").unlink(missing_ok=True)

    def pause_rgw(self) -> None:
        pid = self._pid("rgw")
        if pid is not None and _is_ceph_daemon(pid):
            os.kill(pid, signal.SIGSTOP)

    def resume_rgw(self) -> None:
        pid = self._pid("rgw")
        if pid is not None and _is_ceph_daemon(pid):
            os.kill(pid, signal.SIGCONT)

    def stop(self, keep: bool = False) -> None:
        """Stop radosgw, then the OSD, then the monitor (each by PID); remove the folder."""
        if self.base is None:
            return
        self.resume_rgw()
        for name in ("rgw", "osd.0", "mon.a"):
            pid = self._pid(name)
            if pid is None or not _alive(pid) or not _is_ceph_daemon(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self._owns_base and not keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- administration ----------------------------------------------------------------------

    def create_user(
        self, uid: str, access_key: str, secret_key: str, max_buckets: int = 1000
    ) -> dict:
        out = self._run(
            "radosgw-admin",
            "-n",
            "client.admin",
            "user",
            "create",
            f"--uid={uid}",
            f"--display-name={uid}",
            f"--access-key={access_key}",
            f"--secret-key={secret_key}",
            f"--max-buckets={max_buckets}",
        )
        return json.loads(out)

    def admin(self, *args: str) -> str:
        return self._run("radosgw-admin", "-n", "client.admin", *args)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")) if self.base else []:
            try:
                tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ---- internals ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
        env["CEPH_CONF"] = str(self.conf)
        return env

    def _run(self, *argv: str) -> str:
        proc = subprocess.run(
            list(argv),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: {' | '.join(err)}")
        return proc.stdout.decode("utf-8", "replace")

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.run_dir / f"{name}.pid").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _wait_pid(self, name: str) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = self._pid(name)
            if pid is not None and _alive(pid):
                return pid
            time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no pid file")

    def _conf(self, fsid: str) -> str:
        assert self.base is not None
        d = self.base
        return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{self.mon_port},v1:127.0.0.1:{self.mon_port_v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
crash dir = {d}/crash
keyring = {d}/keyring
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail crit = 1
mon data avail warn = 2
debug ms = 0
debug mon = 0
debug osd = 0
debug rgw = 0
debug monc = 0
debug auth = 0

[mon.a]
# map commits every 50 ms: radosgw's pool creation dominates start-up otherwise
paxos propose interval = 0.05
paxos min wait = 0.01
mon data = {d}/mon
mon cluster log file = {d}/log/mon-cluster.log

[osd.0]
osd data = {d}/osd
osd objectstore = {self.store}
osd class load list = *
osd class default list = *
osd crush update on start = false
memstore device bytes = {self.store_bytes}
bluestore block create = true
bluestore block size = {self.store_bytes}
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = 1073741824
osd op num shards = 2
osd op num threads per shard = 1
# a killed radosgw's watches on the control objects block metadata changes (bucket or user
# creation) until they time out: 30 s by default; 10 s still leaves a live one two pings
osd client watch timeout = 10

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw thread pool size = 64
rgw data = {d}/rgw
rgw dns name = localhost
# radosgw defaults to cephx and a secure mon connection: without these two lines it waits
# 300 s for an auth reply that never comes
auth client required = none
ms mon client mode = crc
rgw init timeout = 60
# deleted or overwritten data is garbage-collected after 2 h by default: collect fast so
# repeated large uploads do not fill the OSD
rgw gc obj min wait = 30
rgw gc processor period = 30
"""


def _need_ceph() -> None:
    for program, package in (
        ("ceph-mon", "ceph-mon"),
        ("ceph-osd", "ceph-osd"),
        ("radosgw", "radosgw"),
        ("radosgw-admin", "radosgw"),
        ("ceph", "ceph-common"),
        ("monmaptool", "ceph-common"),
    ):
        need_program(program, package)


@pytest.fixture(scope="session")
def rgw() -> Iterator[CephRgw]:
    """A running Ceph RGW for the whole session, started on first use (about 1.5 s with
    memstore on a 2-core machine; bluestore about 5 s)."""
    _need_ceph()
    with running(CephRgw()) as server:
        yield server
