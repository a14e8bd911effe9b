#!/usr/bin/env python3
"""Benchmark of the linuxcontainers monitor on a full generated catalog (profile ``mixed``).

Everything runs on loopback: the catalog (and a fake qcow2 header for every disk.qcow2) is
served by the test suite's web server, and each monitor is the real action script in a child
process, so wall time and peak RSS are the child's own. The baseline, measured in the same run,
is a child that only downloads and parses the same images.json (the least any monitor does).

Printed: wall time and peak RSS of the first run (full download) and of a 304 run, as ratios to
the baseline; with VM_IMAGES=yes, the ranged requests of a first and a second run (target for
the second: zero, the virtual sizes are cached by sha256).

    .venv/bin/python bench/lxc_monitor.py [--repeat 3] [--seed 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers.httpd import StaticHttpServer  # noqa: E402

GENERATOR = REPO / "tests" / "tools" / "gen_images_json.py"
SCRIPT = REPO / "remotes" / "market" / "linuxcontainers" / "monitor"
CATALOG = "/streams/v1/images.json"
CHILD_TIMEOUT_S = 300

BASELINE = """
import json, sys, requests
body = requests.get(sys.argv[1], timeout=60).content
json.loads(body)
"""


def qcow2_header(virtual_size: int) -> bytes:
    fields = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(12) + (16).to_bytes(4, "big")
    return (fields + virtual_size.to_bytes(8, "big")).ljust(104, b"\0")


def payload(attrs: dict[str, str]) -> str:
    inner = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in attrs.items())
    xml = (
        "<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><ID>1</ID><NAME>bench</NAME>"
        f"<MARKET_MAD>linuxcontainers</MARKET_MAD><TEMPLATE>{inner}</TEMPLATE>"
        "</MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(xml.encode()).decode()


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, int, bytes]:
    """(wall seconds, peak RSS in KiB, stdout) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, env=env, cwd=REPO)
        deadline = start + CHILD_TIMEOUT_S
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                raise SystemExit(f"{argv[1]} took more than {CHILD_TIMEOUT_S} s")
            time.sleep(0.005)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read() if proc.stderr else b""
        if proc.returncode != 0:
            raise SystemExit(f"child failed: {err.decode(errors='replace')[:500]}")
        out.seek(0)
        return wall, usage.ru_maxrss, out.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median kept)")
    ap.add_argument("--seed", default="1")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lxc-bench-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, str(GENERATOR), "-o", str(work / "srv"), "--profile", "mixed",
             "--seed", args.seed],
            check=True, capture_output=True, timeout=CHILD_TIMEOUT_S,
        )  # fmt: skip
        body = (work / "srv" / "streams" / "v1" / "images.json").read_bytes()
        catalog = json.loads(body)
        server = StaticHttpServer()
        server.routes[CATALOG] = body
        for product in catalog["products"].values():
            for version in product["versions"].values():
                for item in version["items"].values():
                    if item["ftype"] == "disk-kvm.img":
                        server.routes["/" + item["path"]] = qcow2_header(item["size"] * 3)
        server.start()
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        try:
            url = server.url + "/"
            base = [run_child([sys.executable, "-c", BASELINE, url + CATALOG[1:]], env)
                    for _ in range(args.repeat)]  # fmt: skip

            def monitor(attrs: dict[str, str], location: Path) -> tuple[float, int, int]:
                child_env = dict(env, ONE_LOCATION=str(location))
                argv = [sys.executable, str(SCRIPT), payload({"ENDPOINT": url, **attrs}), "0"]
                wall, rss, out = run_child(argv, child_env)
                return wall, rss, out.count(b"APP=")

            first, cached = [], []
            for i in range(args.repeat):
                location = work / f"one-{i}"
                first.append(monitor({}, location))
                cached.append(monitor({}, location))

            vm_location = work / "one-vm"
            qcow2_paths = {p for p in server.routes if p.endswith(".qcow2")}

            def ranged() -> int:
                return sum(1 for r in server.requests if r.path in qcow2_paths)

            before = ranged()
            vm_first = monitor({"VM_IMAGES": "yes", "SKIP_UNTESTED": "no"}, vm_location)
            ranged_first = ranged() - before
            before = ranged()
            vm_second = monitor({"VM_IMAGES": "yes", "SKIP_UNTESTED": "no"}, vm_location)
            ranged_second = ranged() - before
        finally:
            server.stop()

    def med(rows: list[tuple], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    b_wall, b_rss = med(base, 0), med(base, 1)
    print(f"catalog: profile mixed seed {args.seed}, {len(catalog['products'])} products, "
          f"{len(body) / 1e6:.1f} MB; median of {args.repeat} runs")  # fmt: skip
    print(f"baseline (GET + json.loads): {b_wall * 1000:.0f} ms, peak RSS {b_rss / 1024:.1f} MiB")
    for label, rows in (("first run (200)", first), ("second run (304)", cached)):
        wall, rss = med(rows, 0), med(rows, 1)
        print(
            f"{label}: {wall * 1000:.0f} ms ({wall / b_wall:.2f}x baseline), "
            f"peak RSS {rss / 1024:.1f} MiB ({rss / b_rss:.2f}x), {rows[0][2]} apps"
        )
    print(
        f"VM_IMAGES=yes: first run {vm_first[2]} apps, {ranged_first} ranged requests, "
        f"{vm_first[0] * 1000:.0f} ms; second run {ranged_second} ranged requests "
        f"(target 0), {vm_second[0] * 1000:.0f} ms"
    )
    return 0 if ranged_second == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
