"""http-folder backend against real servers: nginx serves PUBLIC_DIR, sshd plays the bridge.

Every fault test checks that PUBLIC_DIR is left exactly as it was: no file, partial or
temporary, remains after a failed import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from onemarket.action import App, ImportInfo, Market
from onemarket.backends.base import Context, ImportRequest, ImportResult
from onemarket.backends.http_folder import HttpFolderBackend
from onemarket.bridge import host_for_app, parse_bridge_list
from onemarket.errors import (
    ChecksumError,
    ConfigError,
    RemoteError,
    SourceError,
    StorageError,
    StorageFullError,
    UnsafePathError,
)
from onemarket.installation import Installation
from onemarket.location import HttpLocation
from onemarket.template import parse_template

from tests.payloads import app_xml, import_info_xml, import_payload
from tests.qemu_img import qemu_img_virtual_size
from tests.servers import need, need_program, small_tmpfs
from tests.servers.httpd import StaticHttpServer, truncated
from tests.servers.nginx import Nginx
from tests.servers.sshd import Sshd
from tests.waiting import WAIT_S, until

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


# helpers ------------------------------------------------------------------------------------


def backend(attrs: dict[str, str]) -> HttpFolderBackend:
    market = Market(id=100, name="private", driver="http", attrs=attrs)
    return HttpFolderBackend(market, Context(Installation.detect()))


def do_import(b: HttpFolderBackend, source: str, app_id: int = 7, md5: str = "") -> ImportResult:
    return b.import_app(
        ImportRequest(App(id=app_id, name="alpine"), ImportInfo(source=source, md5=md5))
    )


def import_at_once(
    b: HttpFolderBackend, folder: Path, count: int, size_bytes: int, app_id: int
) -> list[tuple[Path, ImportResult]]:
    """``count`` different random images (``size_bytes`` plus their index) imported for one
    app by ``count`` threads at once; each source with its result."""
    sources = []
    for i in range(count):
        path = folder / f"img{i}"
        path.write_bytes(os.urandom(size_bytes + i))
        sources.append(path)
    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(lambda p: do_import(b, str(p), app_id=app_id), sources))
    assert len({r.source for r in results}) == count
    return list(zip(sources, results, strict=True))


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


class SlowFifo:
    """A FIFO fed ``chunk`` bytes at a time until ``total`` or until stopped: a source that can
    be cut (``close_early``) or that keeps the copy busy while a fault is injected."""

    def __init__(self, path: Path, total: int, chunk: int = 256 * 1024, pause_s: float = 0.02):
        os.mkfifo(path)
        self.path = path
        self.data = os.urandom(total)
        self.chunk = chunk
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.cut_after: int | None = None
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError:
            return
        try:
            sent = 0
            while sent < len(self.data) and not self.stop.is_set():
                if self.cut_after is not None and sent >= self.cut_after:
                    return
                os.write(fd, self.data[sent : sent + self.chunk])
                sent += self.chunk
                time.sleep(self.pause_s)
        except OSError:
            return
        finally:
            os.close(fd)

    def close(self) -> None:
        self.stop.set()
        # Unblock a writer still waiting for a reader to open the FIFO.
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(WAIT_S)


@pytest.fixture
def attrs(nginx: Nginx) -> dict[str, str]:
    return {"BASE_URL": nginx.base_url, "PUBLIC_DIR": str(nginx.public_dir)}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(3 * MIB + 123))
    return path


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, to fill up (needs root to mount)."""
    with small_tmpfs(tmp_path / "small", 4 * MIB) as mounted:
        need(mounted, "mounting a small tmpfs needs root")
        yield tmp_path / "small"


def sparse_image(path: Path) -> bytes:
    size = 32 * MIB
    with path.open("wb") as f:
        f.truncate(size)
        f.write(os.urandom(64 * 1024))
        f.seek(17 * MIB)
        f.write(os.urandom(5000))
    return path.read_bytes()


# import -------------------------------------------------------------------------------------


def test_import_through_the_runner_is_served_by_nginx(
    nginx: Nginx, attrs: dict[str, str], image: Path
) -> None:
    data = image.read_bytes()
    payload = import_payload(
        "http",
        attrs,
        app=app_xml(id=7),
        import_info=import_info_xml(source=str(image), md5=md5(data), size_mb=4, format="qcow2"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "onemarket.runner", "http", "import", "-"],
        input=payload.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = parse_template(proc.stdout.decode())
    assert out.get("MD5") == md5(data)
    assert out.get("SIZE") == "4"
    assert out.get("FORMAT") == "qcow2"
    source = out.get("SOURCE")
    assert source.startswith(nginx.base_url + "/")
    assert b"INFO:" in proc.stderr
    got = requests.get(source, timeout=10)
    assert got.status_code == 200 and md5(got.content) == md5(data)
    files = list(nginx.public_dir.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(("export_size_mb", "expected"), [(256, "256"), (0, "1")])
def test_size_is_the_image_size_the_export_reports(
    nginx: Nginx, attrs: dict[str, str], tmp_path: Path, export_size_mb: int, expected: str
) -> None:
    """As stock: a qcow2 of 256 MiB virtual size (a few hundred KB on disk) is SIZE 256, the
    export's SIZE; the bytes copied count only when the export gives no SIZE."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(
        [need_program("qemu-img", "qemu-utils"), "create", "-q", "-f", "qcow2", str(image), "256M"],
        check=True,
        timeout=60,
    )
    assert qemu_img_virtual_size(image) == 256 * MIB and image.stat().st_size < MIB
    info = import_info_xml(source=str(image), size_mb=export_size_mb, format="qcow2")
    payload = import_payload("http", attrs, app=app_xml(id=8), import_info=info)
    proc = subprocess.run(
        [sys.executable, "-m", "onemarket.runner", "http", "import", payload, "8"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert parse_template(proc.stdout.decode()).get("SIZE") == expected


def test_import_from_http_and_ssh_sources(
    nginx: Nginx, attrs: dict[str, str], httpd: StaticHttpServer, sshd: Sshd, image: Path
) -> None:
    data = image.read_bytes()
    httpd.routes["/img"] = data
    b = backend(attrs)
    via_http = do_import(b, httpd.url + "/img", md5=md5(data))
    via_ssh = do_import(b, f"ssh://bridge1:{image}", md5=md5(data))
    assert via_http.source != via_ssh.source
    for r in (via_http, via_ssh):
        assert r.md5 == md5(data) and r.size_mb == 4
        assert requests.get(r.source, timeout=10).content == data


def test_sparse_source_stays_sparse(nginx: Nginx, attrs: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "sparse.raw"
    data = sparse_image(src)
    result = do_import(backend(attrs), str(src))
    dst = nginx.public_dir / result.source.rsplit("/", 1)[1]
    assert dst.stat().st_size == len(data)
    assert dst.stat().st_blocks * 512 <= max(src.stat().st_blocks * 512, 128 * 1024)
    assert result.md5 == md5(data)
    assert md5(requests.get(result.source, timeout=10).content) == md5(data)


def test_twenty_concurrent_imports_of_one_app_never_collide(
    nginx: Nginx, attrs: dict[str, str], tmp_path: Path
) -> None:
    for path, r in import_at_once(backend(attrs), tmp_path, 20, 200_000, app_id=7):
        assert r.md5 == md5(path.read_bytes())
        assert (nginx.public_dir / r.source.rsplit("/", 1)[1]).read_bytes() == path.read_bytes()
    assert len(list(nginx.public_dir.iterdir())) == 20


def test_md5_mismatch_leaves_nothing(nginx: Nginx, attrs: dict[str, str], image: Path) -> None:
    before = listing(nginx.public_dir)
    with pytest.raises(ChecksumError, match="MD5 mismatch"):
        do_import(backend(attrs), str(image), md5="0" * 32)
    assert listing(nginx.public_dir) == before


def test_source_cut_mid_copy_leaves_nothing(
    nginx: Nginx, attrs: dict[str, str], tmp_path: Path
) -> None:
    fifo = SlowFifo(tmp_path / "fifo", total=4 * MIB, pause_s=0.0)
    fifo.cut_after = MIB
    try:
        with pytest.raises(ChecksumError):
            do_import(backend(attrs), str(fifo.path), md5=md5(fifo.data))
    finally:
        fifo.close()
    assert listing(nginx.public_dir) == {}


def test_http_source_dropped_mid_copy_leaves_nothing(
    nginx: Nginx, attrs: dict[str, str], httpd: StaticHttpServer
) -> None:
    httpd.routes["/img"] = truncated(os.urandom(2 * MIB), keep=MIB)
    with pytest.raises(SourceError):
        do_import(backend(attrs), httpd.url + "/img")
    assert listing(nginx.public_dir) == {}


def test_full_filesystem_leaves_nothing(small_fs: Path, tmp_path: Path) -> None:
    (small_fs / "existing").write_bytes(b"keep")
    src = tmp_path / "big"
    src.write_bytes(os.urandom(6 * MIB))
    b = backend({"BASE_URL": "http://127.0.0.1:1/m", "PUBLIC_DIR": str(small_fs)})
    with pytest.raises(StorageFullError, match="storage full"):
        do_import(b, str(src))
    assert listing(small_fs) == {"existing": b"keep"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("bridge", [False, True])
def test_stop_signal_mid_copy_leaves_nothing(
    nginx: Nginx,
    attrs: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    bridge: bool,
    sig: signal.Signals,
) -> None:
    """The MAD's SIGTERM, a closed terminal or ssh session (SIGHUP), Ctrl-C: all unwind."""
    if bridge:
        request.getfixturevalue("sshd")  # sets ONE_MARKET_SSH_CONFIG, inherited by the action
        attrs = {**attrs, "BRIDGE_LIST": "bridge1"}
    fifo = SlowFifo(tmp_path / "fifo", total=64 * MIB, pause_s=0.05)
    payload = import_payload(
        "http", attrs, app=app_xml(id=3), import_info=import_info_xml(source=str(fifo.path))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "onemarket.runner", "http", "import", payload, "3"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        until(lambda: temp_files(nginx.public_dir), "the temporary file")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fifo.close()
    assert proc.returncode != 0
    assert out == b""
    assert sig.name.encode() in err and b"Traceback" not in err
    assert listing(nginx.public_dir) == {}


def test_configuration_errors_are_one_line(tmp_path: Path, image: Path) -> None:
    with pytest.raises(ConfigError, match="BASE_URL"):
        backend({"PUBLIC_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="PUBLIC_DIR"):
        backend({"BASE_URL": "http://127.0.0.1/m"})
    with pytest.raises(ConfigError, match="absolute"):
        backend({"BASE_URL": "http://127.0.0.1/m", "PUBLIC_DIR": "relative/dir"})
    with pytest.raises(ConfigError, match="http"):
        backend({"BASE_URL": "ftp://127.0.0.1/m", "PUBLIC_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"BASE_URL is not a valid URL \(unbalanced") as bad:
        backend({"BASE_URL": "http://u:Base-Secret-1@[::1/m", "PUBLIC_DIR": str(tmp_path)})
    assert "Base-Secret-1" not in str(bad.value)
    missing = backend({"BASE_URL": "http://127.0.0.1/m", "PUBLIC_DIR": str(tmp_path / "no")})
    with pytest.raises(StorageError, match="PUBLIC_DIR"):
        do_import(missing, str(image))
    with pytest.raises(StorageError, match="PUBLIC_DIR"):
        missing.monitor()


def test_unknown_scheme_names_it(nginx: Nginx, attrs: dict[str, str], tmp_path: Path) -> None:
    b = HttpFolderBackend(
        Market(1, "m", "http", attrs),
        Context(Installation.detect({"ONE_LOCATION": str(tmp_path)})),
    )
    with pytest.raises(SourceError, match="gopher"):
        do_import(b, "gopher://127.0.0.1/x")
    assert listing(nginx.public_dir) == {}


def test_other_schemes_go_through_the_stock_downloader(
    nginx: Nginx, attrs: dict[str, str], tmp_path: Path, image: Path
) -> None:
    """A stand-in downloader.sh (``<url> -`` writes the image on stdout, as the stock one)."""
    remotes = tmp_path / "one" / "var" / "remotes" / "datastore"
    remotes.mkdir(parents=True)
    script = remotes / "downloader.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = "rbd://pool/img" ] && [ "$2" = - ] && cat {image}\n')
    script.chmod(0o755)
    b = HttpFolderBackend(
        Market(1, "m", "http", attrs),
        Context(Installation.detect({"ONE_LOCATION": str(tmp_path / "one")})),
    )
    data = image.read_bytes()
    result = do_import(b, "rbd://pool/img", md5=md5(data))
    assert requests.get(result.source, timeout=10).content == data
    with pytest.raises(SourceError):
        do_import(b, "rbd://pool/other")
    assert len(list(nginx.public_dir.iterdir())) == 1


# delete -------------------------------------------------------------------------------------


def test_delete_removes_the_file_and_tolerates_a_missing_one(
    nginx: Nginx, attrs: dict[str, str], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = backend(attrs)
    result = do_import(b, str(image))
    assert b.delete_app(App(id=7, name="a", source=result.source)) is True
    assert listing(nginx.public_dir) == {}
    assert requests.get(result.source, timeout=10).status_code == 404
    assert b.delete_app(App(id=7, name="a", source=result.source)) is False
    assert "WARN:" in capsys.readouterr().err


def test_delete_of_an_app_without_source_is_a_warning(
    nginx: Nginx, attrs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    (nginx.public_dir / "x").write_bytes(b"x")
    backend(attrs).delete_app(App(id=7, name="a", source=""))
    assert "WARN:" in capsys.readouterr().err
    assert listing(nginx.public_dir) == {"x": b"x"}


def test_delete_of_a_stock_driver_file(nginx: Nginx, attrs: dict[str, str]) -> None:
    stock = hashlib.md5(b"1700000000:7").hexdigest()
    (nginx.public_dir / stock).write_bytes(b"x")
    backend(attrs).delete_app(App(id=7, name="a", source=f"{nginx.base_url}/{stock}"))
    assert listing(nginx.public_dir) == {}


TRAVERSALS = [
    "{base}/../victim",
    "{base}/%2e%2e/victim",
    "{base}/%2E%2E%2Fvictim",
    "{base}/%252e%252e/victim",
    "{base}//{outside}/victim",
    "{base}/sub/../../victim",
    "{base}/./x",
    "{base}/",
    "{base}",
    "{base}-other/victim",
    "http://127.0.0.2:1/market/victim",
    "{outside}/victim",
    "{base}/x?y=1",
    "{base}/x%00",
]


@pytest.mark.parametrize("template", TRAVERSALS)
def test_delete_refuses_paths_leaving_public_dir(
    nginx: Nginx, attrs: dict[str, str], tmp_path: Path, template: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (nginx.public_dir / "x").write_bytes(b"x")
    source = template.format(base=nginx.base_url, outside=str(tmp_path).lstrip("/"))
    with pytest.raises(UnsafePathError):
        backend(attrs).delete_app(App(id=7, name="a", source=source))
    assert victim.read_bytes() == b"precious"
    assert (nginx.public_dir / "x").exists()


def test_delete_refuses_symlinks_out(nginx: Nginx, attrs: dict[str, str], tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (nginx.public_dir / "link").symlink_to(victim)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    (outdir / "f").write_bytes(b"precious")
    (nginx.public_dir / "dirlink").symlink_to(outdir)
    b = backend(attrs)
    for name in ("link", "dirlink/f"):
        with pytest.raises(UnsafePathError, match="refused"):
            b.delete_app(App(id=7, name="a", source=f"{nginx.base_url}/{name}"))
    assert victim.read_bytes() == b"precious" and (outdir / "f").exists()
    assert (nginx.public_dir / "link").is_symlink()


def test_relative_path_accepts_plain_names() -> None:
    assert str(HttpLocation.parse("http://h/m/app-1-ab", "http://h/m/").path) == "app-1-ab"
    assert str(HttpLocation.parse("http://h/m/a%2Db", "http://h/m").path) == "a-b"
    assert str(HttpLocation.parse("http://h/m/d/f.qcow2", "http://h/m").path) == "d/f.qcow2"


# monitor ------------------------------------------------------------------------------------


def test_monitor_reports_the_filesystem_of_public_dir(small_fs: Path) -> None:
    (small_fs / "f").write_bytes(os.urandom(MIB))
    result = backend({"BASE_URL": "http://127.0.0.1/m", "PUBLIC_DIR": str(small_fs)}).monitor()
    assert result.total_mb == 4
    assert result.used_mb == 1 and result.free_mb == 3
    assert result.apps == []
    assert "APP" not in result.to_template()


# BRIDGE_LIST --------------------------------------------------------------------------------


@pytest.fixture
def bridge_attrs(nginx: Nginx, sshd: Sshd) -> dict[str, str]:
    return {
        "BASE_URL": nginx.base_url,
        "PUBLIC_DIR": str(nginx.public_dir),
        "BRIDGE_LIST": "bridge1 bridge2",
    }


def add_dead_alias(sshd: Sshd, alias: str = "deadhost") -> None:
    """A host alias whose port has no server: ssh to it fails at once."""
    with sshd.config.open("a") as f:
        f.write(f"Host {alias}\n    HostName 127.0.0.1\n    Port 1\n")


def test_bridge_import_delete_monitor(
    nginx: Nginx, sshd: Sshd, bridge_attrs: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "sparse.raw"
    data = sparse_image(src)
    b = backend(bridge_attrs)
    result = do_import(b, str(src), app_id=8, md5=md5(data))
    assert result.md5 == md5(data) and result.size_mb == 32
    dst = nginx.public_dir / result.source.rsplit("/", 1)[1]
    assert dst.stat().st_blocks * 512 <= max(src.stat().st_blocks * 512, 128 * 1024)
    assert md5(requests.get(result.source, timeout=10).content) == md5(data)
    assert temp_files(nginx.public_dir) == []
    mon = b.monitor()
    st = os.statvfs(nginx.public_dir)
    assert mon.total_mb == st.f_blocks * st.f_frsize // MIB
    assert b.delete_app(App(id=8, name="a", source=result.source)) is True
    assert listing(nginx.public_dir) == {}
    assert b.delete_app(App(id=8, name="a", source=result.source)) is False  # WARN, success


def test_bridge_host_is_chosen_by_app_id(
    nginx: Nginx, sshd: Sshd, image: Path, tmp_path: Path
) -> None:
    add_dead_alias(sshd)
    attrs = {
        "BASE_URL": nginx.base_url,
        "PUBLIC_DIR": str(nginx.public_dir),
        "BRIDGE_LIST": "bridge1 deadhost",
    }
    b = backend(attrs)
    do_import(b, str(image), app_id=4)
    with pytest.raises(RemoteError, match="deadhost"):
        do_import(b, str(image), app_id=5)
    assert temp_files(nginx.public_dir) == []
    assert len(list(nginx.public_dir.iterdir())) == 1


def test_bridge_skips_hosts_oned_reports_unusable(
    nginx: Nginx, sshd: Sshd, image: Path, fake_oned: object
) -> None:
    from tests.servers.fake_oned import FakeHost

    add_dead_alias(sshd)
    fake_oned.hosts = [FakeHost(0, "bridge1"), FakeHost(1, "deadhost", state=4)]  # type: ignore[attr-defined]
    attrs = {
        "BASE_URL": nginx.base_url,
        "PUBLIC_DIR": str(nginx.public_dir),
        "BRIDGE_LIST": "bridge1 deadhost",
    }
    result = do_import(backend(attrs), str(image), app_id=5)
    assert requests.get(result.source, timeout=10).content == image.read_bytes()


def test_bridge_md5_mismatch_leaves_nothing(
    nginx: Nginx, bridge_attrs: dict[str, str], image: Path
) -> None:
    with pytest.raises(ChecksumError):
        do_import(backend(bridge_attrs), str(image), md5="f" * 32)
    assert listing(nginx.public_dir) == {}


def test_bridge_connection_killed_mid_copy_leaves_nothing(
    nginx: Nginx, sshd: Sshd, bridge_attrs: dict[str, str], tmp_path: Path
) -> None:
    fifo = SlowFifo(tmp_path / "fifo", total=64 * MIB, pause_s=0.05)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            do_import(backend(bridge_attrs), str(fifo.path))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        until(lambda: temp_files(nginx.public_dir), "the remote temporary file")
        assert sshd.kill_sessions() >= 1
        worker.join(WAIT_S * 3)
    finally:
        fifo.close()
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RemoteError), errors
    assert listing(nginx.public_dir) == {}


def test_bridge_full_filesystem_leaves_nothing(sshd: Sshd, small_fs: Path, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(6 * MIB))
    b = backend(
        {"BASE_URL": "http://127.0.0.1/m", "PUBLIC_DIR": str(small_fs), "BRIDGE_LIST": "bridge1"}
    )
    with pytest.raises(StorageFullError):
        do_import(b, str(src))
    assert listing(small_fs) == {}
    mon = b.monitor()
    assert mon.total_mb == 4


def test_bridge_delete_refuses_symlinks_out(
    nginx: Nginx, bridge_attrs: dict[str, str], tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (nginx.public_dir / "link").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="outside"):
        backend(bridge_attrs).delete_app(App(id=1, name="a", source=f"{nginx.base_url}/link"))
    assert victim.read_bytes() == b"precious"


def test_bridge_missing_public_dir_is_a_clear_failure(
    sshd: Sshd, tmp_path: Path, image: Path
) -> None:
    b = backend(
        {
            "BASE_URL": "http://127.0.0.1/m",
            "PUBLIC_DIR": str(tmp_path / "nowhere"),
            "BRIDGE_LIST": "bridge1",
        }
    )
    with pytest.raises(StorageError, match="does not exist"):
        b.monitor()
    with pytest.raises(StorageError, match="does not exist"):
        do_import(b, str(image))


def test_bridge_list_parsing_and_choice() -> None:
    hosts = parse_bridge_list("a b,c  a")
    assert hosts == ["a", "b", "c"]
    assert [host_for_app(hosts, i) for i in range(4)] == ["a", "b", "c", "a"]
    with pytest.raises(ConfigError):
        parse_bridge_list("good -oProxyCommand=evil")


def leftovers(folder: Path) -> tuple[Path, Path, list[Path]]:
    """An old temporary file of ours, a fresh one, and old entries that are not ours (the
    administrator's, even when named like ours: PUBLIC_DIR is shared)."""
    old = folder / f".app-3-{'a' * 32}.part"
    fresh = folder / f".app-4-{'b' * 32}.part"
    foreign = [folder / ".other.part", folder / ".app-notes.part", folder / ".app-dir.part"]
    for p in (old, fresh, *foreign[:2]):
        p.write_bytes(b"partial")
    foreign[2].mkdir()
    (foreign[2] / "keep.txt").write_bytes(b"mine")
    two_days_ago = time.time() - 2 * 86400
    for p in (old, *foreign):
        os.utime(p, (two_days_ago, two_days_ago))
    return old, fresh, foreign


@pytest.mark.parametrize("bridge", [False, True])
def test_monitor_removes_only_old_leftovers_of_ours(nginx: Nginx, sshd: Sshd, bridge: bool) -> None:
    old, fresh, foreign = leftovers(nginx.public_dir)
    attrs = {"BASE_URL": nginx.base_url, "PUBLIC_DIR": str(nginx.public_dir)}
    if bridge:
        attrs["BRIDGE_LIST"] = "bridge2"
    backend(attrs).monitor()
    assert not old.exists()
    assert fresh.exists() and all(p.exists() for p in foreign)
    assert (foreign[2] / "keep.txt").exists()


def test_concurrent_bridge_imports_never_collide(
    nginx: Nginx, bridge_attrs: dict[str, str], tmp_path: Path
) -> None:
    """Eight at once (two ssh connections each): names come from the same generator as the
    local twenty-at-once test, this checks the remote rename side."""
    for path, r in import_at_once(backend(bridge_attrs), tmp_path, 8, 100_000, app_id=9):
        assert requests.get(r.source, timeout=10).content == path.read_bytes()
    assert temp_files(nginx.public_dir) == []
