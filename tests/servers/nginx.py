"""nginx (Debian nginx-light) on a free loopback port, serving a PUBLIC_DIR at a BASE_URL.

The suite starts its own nginx with its own prefix, config, pid file and logs in a temporary
folder, in the foreground (``daemon off``) so stopping it is stopping one process.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port, need_program, wait_for_port

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
URL_PATH = "/market"

_CONF = """worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user}
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location {url_path}/ {{
            alias {public_dir}/;
            disable_symlinks off;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """One nginx serving ``public_dir`` at ``http://127.0.0.1:<port>/market``."""

    root: Path
    public_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{URL_PATH}"

    def start(self) -> None:
        binary = need_program("nginx", "nginx-light")
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        conf = self.root / "nginx.conf"
        conf.write_text(
            _CONF.format(
                root=self.root,
                port=self.port,
                public_dir=self.public_dir,
                url_path=URL_PATH,
                user=user,
            )
        )
        log = (self.root / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.root), "-c", str(conf), "-e", str(self.root / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        if not wait_for_port(self.port, timeout_s=START_TIMEOUT_S):
            self.stop()
            errors = (self.root / "error.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nginx did not start on port {self.port}: {errors}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self.proc = None


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """A running nginx whose ``public_dir`` is empty and served at ``base_url``."""
    server = Nginx(root=tmp_path / "nginx", public_dir=tmp_path / "public")
    server.start()
    try:
        yield server
    finally:
        server.stop()
