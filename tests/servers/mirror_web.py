"""nginx serving a ``one-market mirror`` tree on loopback with the README's rule.

The tree is served at ``/mirror/``; the one rule a ``one`` mirror needs (``GET
<ENDPOINT>/appliance`` answered from ``appliance.json``) is the exact-match location given in
README.md, so the test checks what administrators are told to write.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port, need_program, start_process, stop_process

URL_PATH = "/mirror"

# the two location blocks below are README.md's "nginx" rule, word for word
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
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location /mirror/ {{
            alias {tree}/;
        }}
        location = /mirror/appliance {{
            alias {tree}/appliance.json;
            default_type application/json;
        }}
    }}
}}
"""


@dataclass
class MirrorWeb:
    """One nginx serving ``tree`` at ``http://127.0.0.1:<port>/mirror/``."""

    root: Path
    tree: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The mirror's ENDPOINT (with its trailing slash, as a marketplace template has it)."""
        return f"http://127.0.0.1:{self.port}{URL_PATH}/"

    def start(self) -> None:
        binary = need_program("nginx", "nginx-light")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tree.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        conf = self.root / "nginx.conf"
        conf.write_text(_CONF.format(root=self.root, port=self.port, tree=self.tree, user=user))
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


@contextlib.contextmanager
def running_mirror_web(folder: Path) -> Iterator[MirrorWeb]:
    """A started nginx serving the (empty) folder ``folder/tree`` as a mirror."""
    server = MirrorWeb(root=folder / "mirror-nginx", tree=folder / "tree")
    server.start()
    try:
        yield server
    finally:
        server.stop()
