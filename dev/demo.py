"""End-to-end demo without oned: a local http-folder marketplace served by nginx on loopback.

Installs the drivers into a temporary ONE_LOCATION with install.sh, starts nginx serving the
market's PUBLIC_DIR, checks the market with ``one-market check``, then plays oned: spawns the
MAD, sends INIT, IMPORT (the MAD runs a datastore ``export`` first, as oned's MAD does), MONITOR
and DELETE over real pipes, downloads the published SOURCE and compares its MD5, and stops the
MAD with FINALIZE. Everything lives in a temp folder removed at the end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onemarket.template import parse_template  # noqa: E402

from tests.payloads import (  # noqa: E402
    app_xml,
    delete_payload,
    image_xml,
    import_payload,
    monitor_payload,
)
from tests.servers.nginx import Nginx  # noqa: E402
from tests.servers.oned import install  # noqa: E402

IMAGE_MB = 64
"""Size of the demo image (mostly a hole: 8 MiB of data, the rest sparse)."""
EXPORT_SCRIPT = """#!{python}
# A stand-in for a datastore's export action: reads DS_DRIVER_ACTION_DATA (base64) on stdin
# and prints IMPORT_INFO for the image file, as remotes/datastore/fs/export does.
import base64, hashlib, os, sys
from xml.etree import ElementTree as ET
doc = ET.fromstring(base64.b64decode(sys.stdin.read()))
path = doc.findtext("IMAGE/SOURCE")
md5 = hashlib.md5()
with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        md5.update(chunk)
size_mb = (os.path.getsize(path) + (1 << 20) - 1) >> 20
print(f"<IMPORT_INFO><IMPORT_SOURCE>{{path}}</IMPORT_SOURCE><MD5>{{md5.hexdigest()}}</MD5>"
      f"<SIZE>{{size_mb}}</SIZE><FORMAT>raw</FORMAT><DISPOSE>NO</DISPOSE>"
      f"<DISPOSE_CMD></DISPOSE_CMD></IMPORT_INFO>")
"""


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def make_image(path: Path) -> str:
    with path.open("wb") as f:
        f.truncate(IMAGE_MB << 20)
        f.seek(4 << 20)
        f.write(os.urandom(8 << 20))
    return hashlib.md5(path.read_bytes()).hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="onemarket-demo-") as tmp_s:
        tmp = Path(tmp_s)
        step(f"install.sh -d {tmp}/one (ONE_LOCATION layout)")
        one = install(tmp / "one")
        one.add_datastore("fs", EXPORT_SCRIPT.format(python=sys.executable))

        web = Nginx(root=tmp / "nginx", public_dir=tmp / "public")
        web.start()
        try:
            attrs = {"BASE_URL": web.base_url, "PUBLIC_DIR": str(web.public_dir)}
            step(f"nginx serves PUBLIC_DIR {web.public_dir} at {web.base_url}")
            tmpl = tmp / "market.tmpl"
            tmpl.write_text(
                'NAME = "demo"\nMARKET_MAD = "http"\n'
                + "".join(f'{k} = "{v}"\n' for k, v in attrs.items())
            )
            step("one-market check market.tmpl")
            env = dict(os.environ, ONE_LOCATION=str(one.root))
            check = subprocess.run(
                [str(one.root / "bin" / "one-market"), "check", str(tmpl)],
                env=env,
                timeout=60,
                check=False,
            )
            if check.returncode != 0:
                return 1

            image = tmp / "disk.raw"
            md5 = make_image(image)
            step(f"image {image} ({IMAGE_MB} MiB, md5 {md5})")
            mad = one.start("-t", "4", "-w", "600")
            mad.send("INIT")
            step(f"MAD answered INIT with: {(mad.next_line() or '').strip()}")

            started = time.monotonic()
            payload = import_payload(
                "http",
                attrs,
                app=app_xml(id=0, name="demo app"),
                image=image_xml(source=str(image), size_mb=IMAGE_MB, format="raw"),
            )
            mad.request("IMPORT", 0, payload)
            reply = mad.reply(timeout_s=300)
            if not reply.ok:
                print(f"IMPORT FAILURE: {reply.info}")
                return 1
            result = parse_template(reply.decoded()).as_dict()
            step(f"IMPORT SUCCESS in {time.monotonic() - started:.2f} s: {result}")

            got = hashlib.md5(requests.get(result["SOURCE"], timeout=60).content).hexdigest()
            step(f"GET {result['SOURCE']}: md5 {got} ({'matches' if got == md5 else 'MISMATCH'})")
            if got != md5 or result["MD5"] != md5:
                return 1

            mad.request("MONITOR", 100, monitor_payload("http", attrs))
            step(f"MONITOR: {mad.reply().decoded().decode().strip().replace(chr(10), ', ')}")

            app = app_xml(id=0, name="demo app", source=result["SOURCE"])
            mad.request("DELETE", 0, delete_payload("http", attrs, app=app))
            reply = mad.reply()
            step(f"DELETE {reply.result} {reply.id} {reply.info}")
            left = [p.name for p in web.public_dir.iterdir()]
            step(f"PUBLIC_DIR now holds {left or 'nothing'}")
            step(f"FINALIZE: MAD exit status {mad.finalize()}")
            step("LOG lines the MAD sent to oned:")
            for log in mad.logs:
                print(f"    LOG {log.severity} {log.id} {log.message}")
        finally:
            web.stop()
    step("demo done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
