"""nginx serving a ``one-market mirror`` tree on loopback with the README's rule.

The tree is served at ``/mirror/``; the one rule a ``one`` mirror needs (``GET
<ENDPOINT>/appliance`` answered from ``appliance.json``) is the exact-match location given in
README.md, so the test checks what administrators are told to write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.servers import running
from tests.servers.nginx import Nginx

URL_PATH = "/mirror"

# README.md's "nginx" rule, word for word ({public_dir} is the mirror folder)
_LOCATIONS = """        location /mirror/ {{
            alias {public_dir}/;
        }}
        location = /mirror/appliance {{
            alias {public_dir}/appliance.json;
            default_type application/json;
        }}"""


@dataclass
class MirrorWeb(Nginx):
    """One nginx serving the mirror folder ``public_dir`` at ``http://127.0.0.1:<port>/mirror/``."""

    LOCATIONS: ClassVar[str] = _LOCATIONS
    TYPES: ClassVar[str] = "application/json json;"

    @property
    def tree(self) -> Path:
        """The mirror folder served."""
        return self.public_dir

    @property
    def url(self) -> str:
        """The mirror's ENDPOINT (with its trailing slash, as a marketplace template has it)."""
        return f"http://127.0.0.1:{self.port}{URL_PATH}/"


@contextlib.contextmanager
def running_mirror_web(folder: Path) -> Iterator[MirrorWeb]:
    """A started nginx serving the (empty) folder ``folder/tree`` as a mirror."""
    with running(MirrorWeb(root=folder / "mirror-nginx", public_dir=folder / "tree")) as server:
        yield server
