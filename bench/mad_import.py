#!/usr/bin/env python3
"""The full IMPORT of an http app through the one_market MAD, against md5sum + cp.

Installs the drivers into a temporary ONE_LOCATION and starts the MAD as oned does
(tests/servers/oned.py: ``install.sh -d DIR -P <this python>``, one-word ARGUMENTS, INIT), with
a datastore whose ``export`` behaves like the stock ``fs`` one: it runs ``md5sum`` on the image
and prints ``<IMPORT_INFO>`` naming the image, with that MD5, the image's SIZE and FORMAT. Each
run sends two IMPORTs of a SIZE MiB random file to an http market (PUBLIC_DIR in the scratch
folder), timed from the request line to the reply line:

- overlapped: the IMAGE's SOURCE is the file, so our import copies it while the export runs
  and publishes after the export's answer (workflow.overlap_guess);
- sequential: the IMAGE's SOURCE is not a local path (as on Ceph), so the export runs first,
  then our import (read, MD5 verified against the export's, sparse write, fsync, rename).

In the same run, alternating: ``md5sum`` and ``cp`` of the same file, and our import action
alone. Prints medians and the ratios to md5sum + cp (issue 15's target: 1.2, for the
overlapped IMPORT).

    .venv/bin/python bench/mad_import.py [--size-mib 1024] [--runs 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "lib"))

from _common import (  # noqa: E402
    empty,
    load_average,
    machine_line,
    random_image,
    run_import,
    scratch,
    timed,
)

from tests.payloads import app_xml, datastore_xml, image_xml, import_payload  # noqa: E402
from tests.servers.oned import install  # noqa: E402

TARGET_RATIO = 1.2
REPLY_TIMEOUT_S = 600.0
"""Longest wait for one IMPORT reply (a 1 GiB import takes seconds)."""
DS_MAD = "benchfs"

EXPORT_SCRIPT = """#!/bin/sh
# like the fs datastore's export: MD5 of the image, then IMPORT_INFO naming it
cat > /dev/null
sum=$(md5sum -- '{image}' | cut -d' ' -f1) || exit 1
echo "<IMPORT_INFO><IMPORT_SOURCE><![CDATA[{image}]]></IMPORT_SOURCE>\
<MD5><![CDATA[$sum]]></MD5><SIZE><![CDATA[{size_mb}]]></SIZE>\
<FORMAT><![CDATA[raw]]></FORMAT><DISPOSE>NO</DISPOSE></IMPORT_INFO>"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the random image")
    ap.add_argument("--runs", type=int, default=5, help="IMPORTs (and baselines) to time")
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder (needs 2 x size free)")
    args = ap.parse_args()

    with scratch(args.dir) as root:
        image, public = root / "image.raw", root / "public"
        random_image(image, args.size_mib)
        one = install(root / "one")
        one.add_datastore(DS_MAD, EXPORT_SCRIPT.format(image=image, size_mb=args.size_mib))
        mad = one.start("-t", "15", "-m", "http")
        attrs = {"BASE_URL": "http://127.0.0.1:9/market", "PUBLIC_DIR": str(public)}
        imports: list[float] = []
        sequential: list[float] = []
        md5sums: list[float] = []
        cps: list[float] = []
        actions: list[float] = []
        load_before = load_average()
        try:
            for n in range(args.runs):
                md5sums.append(timed(["md5sum", str(image)]).seconds)
                cps.append(timed(["cp", str(image), str(public / "copy")]).seconds)
                empty(public)
                actions.append(run_import(image, public).seconds)
                empty(public)
                for source, times in ((str(image), imports), ("benchfs:image", sequential)):
                    payload = import_payload(
                        "http",
                        attrs,
                        app=app_xml(id=100 + n),
                        image=image_xml(source=source, size_mb=args.size_mib, format="raw"),
                        datastore=datastore_xml(ds_mad=DS_MAD),
                    )
                    start = time.perf_counter()
                    mad.request("IMPORT", 100 + n, payload)
                    reply = mad.reply(timeout_s=REPLY_TIMEOUT_S)
                    times.append(time.perf_counter() - start)
                    if not reply.ok:
                        sys.exit(f"IMPORT failed: {reply.info}")
                    empty(public)
        finally:
            mad.close()
    med = statistics.median
    base = [m + c for m, c in zip(md5sums, cps, strict=True)]
    ratio = med(i / b for i, b in zip(imports, base, strict=True))
    seq = med(i / b for i, b in zip(sequential, base, strict=True))
    print(machine_line(load_before, args.runs))
    print(
        f"  md5sum {med(md5sums):.2f} s | cp {med(cps):.2f} s | import action alone "
        f"{med(actions):.2f} s | IMPORT overlapped {med(imports):.2f} s, sequential "
        f"{med(sequential):.2f} s"
    )
    print(f"  overlapped IMPORT / (md5sum + cp) = {ratio:.2f}  (target <= {TARGET_RATIO})")
    print(f"  sequential IMPORT / (md5sum + cp) = {seq:.2f}  (export, then import)")
    print("target met" if ratio <= TARGET_RATIO else "target NOT met")


if __name__ == "__main__":
    main()
