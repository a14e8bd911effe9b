"""nginx serving a ``one-market mirror`` tree on loopback with the README's rule.

The tree is served at ``/mirror/``; the one rule a ``one`` mirror needs (``GET
<ENDPOINT>/appliance`` answered from ``appliance.json``) is the exact-match location given in
README.md, so the test checks what administrators are told to write.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import stop_process
from tests.servers.nginx import start_nginx

URL_PATH = "/mirror"

# README.md's "nginx" rule, word for word
_LOCATIONS = """        location /mirror/ {{
            alias {tree}/;
        }}
        location = /mirror/appliance {{
            alias {tree}/appliance.json;
            default_type application/json;
        }}"""


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
        self.tree.mkdir(parents=True, exist_ok=True)
        locations = _LOCATIONS.format(tree=self.tree)
        self.port, self.proc = start_nginx(self.root, locations, types="application/json json;")

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
