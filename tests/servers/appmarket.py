"""An appmarket-simple-like catalog server on loopback, with small real appliance files.

It answers as OpenNebula's appmarket-simple does: ``GET /appliance`` is ``{"sEcho": 1,
"appliances": [...]}``; ``GET /appliance/<id>/download/<n>`` redirects (302) to the file's
``url``, which this server also serves (``/cdn/<id>-<n>.qcow2``, with Range and validators,
as a CDN would). The appliances are those of the real Community Marketplace answer in
tests/data, their files replaced by small random bytes whose size, md5 and sha256 are set in
the catalog, so a client can download and verify them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.servers import running
from tests.servers.httpd import StaticHttpServer

COMMUNITY_ANSWER = Path(__file__).resolve().parents[1] / "data" / "one-community-appliance.json"
FILE_BYTES = 64 * 1024
"""Size of the first appliance's file; the others grow by a few KiB each (distinct sizes)."""


def redirect(location: str):
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("OpenNebula-AppMarket-Size", "0")
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handler


@dataclass
class Appmarket:
    """The catalog (``appliances``), the files' bytes by CDN path, and the server."""

    server: StaticHttpServer = field(default_factory=StaticHttpServer)
    appliances: list[dict] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def load_community(self, seed: int = 1) -> None:
        """The real Community Marketplace appliances with small random files."""
        rng = random.Random(seed)
        doc = json.loads(COMMUNITY_ANSWER.read_bytes())
        self.appliances = copy.deepcopy(doc["appliances"])
        for index, app in enumerate(self.appliances):
            for n, _f in enumerate(app.get("files") or []):
                self.set_file(app, n, rng.randbytes(FILE_BYTES + 4096 * index + n))
        self.publish()

    def set_file(self, app: dict, n: int, data: bytes) -> None:
        """Give file ``n`` of ``app`` these bytes (catalog size and checksums follow)."""
        app_id = app["_id"]["$oid"]
        cdn = f"/cdn/{app_id}-{n}.qcow2"
        self.blobs[cdn] = data
        md5 = hashlib.md5(data).hexdigest()
        f = app["files"][n]
        f.update(
            url=self.url + cdn,
            size=len(data),
            md5=md5,
            checksum={"md5": md5, "sha256": hashlib.sha256(data).hexdigest()},
        )

    def by_name(self, name: str) -> dict:
        return next(a for a in self.appliances if a["name"] == name)

    def publish(self) -> None:
        """(Re)build every route from ``appliances`` and ``blobs``."""
        routes = self.server.routes
        routes.clear()
        for app in self.appliances:
            app_id = app["_id"]["$oid"]
            app.setdefault("links", {})["download"] = {
                "href": f"{self.url}/appliance/{app_id}/download"
            }
            for n, f in enumerate(app.get("files") or []):
                routes[f"/appliance/{app_id}/download/{n}"] = redirect(f["url"])
        routes.update(self.blobs)
        routes["/appliance"] = routes["/appliance/"] = json.dumps(
            {"sEcho": 1, "appliances": self.appliances}
        ).encode()

    def file_requests(self) -> int:
        """GETs of appliance files (the CDN paths) so far."""
        return sum(1 for r in self.server.requests if r.path.startswith("/cdn/"))


@contextlib.contextmanager
def running_appmarket() -> Iterator[Appmarket]:
    """A started server holding the Community Marketplace appliances (stopped on exit)."""
    market = Appmarket()
    with running(market.server):
        market.load_community()
        yield market
