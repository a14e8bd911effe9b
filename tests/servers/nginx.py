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

from tests.servers import free_port, need_program, start_process, stop_process

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
        errors = self.root / "error.log"
        self.proc = start_process(
            [binary, "-p", str(self.root), "-c", str(conf), "-e", str(errors)],
            log=self.root / "stderr.log",
            port=self.port,
            what="nginx",
            errors=errors,
        )

    def stop(self) -> None:
        stop_process(self.proc)
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
