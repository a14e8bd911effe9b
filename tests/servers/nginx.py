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
from typing import ClassVar

import pytest

from tests.servers import free_port, need_program, running, start_process, stop_process

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
    types {{ {types} }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
{locations}
    }}
}}
"""
_MARKET_LOCATIONS = """        location {url_path}/ {{
            alias {public_dir}/;
            disable_symlinks off;
        }}"""


def start_nginx(
    root: Path, locations: str, types: str = "application/octet-stream bin;"
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start an nginx with its prefix, config and logs in ``root``, serving the ``location``
    blocks ``locations`` on a free loopback port: (port, process)."""
    binary = need_program("nginx", "nginx-light")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(_CONF.format(root=root, port=port, user=user, types=types, locations=locations))
    errors = root / "error.log"
    proc = start_process(
        [binary, "-p", str(root), "-c", str(conf), "-e", str(errors)],
        log=root / "stderr.log",
        port=port,
        what="nginx",
        errors=errors,
    )
    return port, proc


@dataclass
class Nginx:
    """One nginx serving ``public_dir`` at ``http://127.0.0.1:<port>/market``."""

    root: Path
    public_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    LOCATIONS: ClassVar[str] = _MARKET_LOCATIONS
    """The ``location`` blocks, with ``{url_path}`` and ``{public_dir}`` to fill in."""
    TYPES: ClassVar[str] = "application/octet-stream bin;"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{URL_PATH}"

    def start(self) -> None:
        self.public_dir.mkdir(parents=True, exist_ok=True)
        locations = self.LOCATIONS.format(url_path=URL_PATH, public_dir=self.public_dir)
        self.port, self.proc = start_nginx(self.root, locations, self.TYPES)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """A running nginx whose ``public_dir`` is empty and served at ``base_url``."""
    with running(Nginx(root=tmp_path / "nginx", public_dir=tmp_path / "public")) as server:
        yield server
