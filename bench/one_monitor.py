"""Benchmark of the ``one`` driver monitor against catalogs served on loopback.

Catalogs: the shared Community Marketplace answer (tests/data/one-community-appliance.json) and a
synthetic one 20 times larger (the same appliances with new ids and names). For each, three
measurements, each in a fresh child process so that peak RSS belongs to that run alone:

- baseline: GET the catalog and decode its JSON (requests + json, no cache, no mapping): the
  least any monitor must do;
- monitor: the driver's monitor with an empty cache (full 200 answer), output text built;
- monitor 304: the same with a warm cache (the server answers 304, the cached copy is used).

Prints wall time (median of REPEATS runs, timed inside the child, interpreter start excluded)
and peak RSS, each with its ratio to the baseline measured in the same run.

    .venv/bin/python bench/one_monitor.py [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "lib"))

CATALOG_PATH = REPO / "tests" / "data" / "one-community-appliance.json"
SCALE = 20
"""How many times larger the synthetic catalog is than the shared one."""
REPEATS = 5
CHILD_TIMEOUT_S = 300


def synthetic(doc: dict, scale: int) -> bytes:
    apps = []
    for copy_index in range(scale):
        for raw in doc["appliances"]:
            app = copy.deepcopy(raw)
            app["_id"] = {"$oid": f"{raw['_id']['$oid']}-{copy_index}"}
            app["name"] = f"{raw['name']} #{copy_index}"
            apps.append(app)
    return json.dumps({"sEcho": 1, "appliances": apps}).encode()


# --------------------------------------------------------------------------- child side


def child(mode: str, endpoint: str, cache_dir: str) -> dict:
    if mode == "baseline":
        import requests

        start = time.perf_counter()
        with requests.Session() as session:
            resp = session.get(f"{endpoint}/appliance", timeout=60)
            doc = json.loads(resp.content)
        wall = time.perf_counter() - start
        count = len(doc["appliances"])
    else:
        from onemarket import driverlog
        from onemarket.action import Market
        from onemarket.backends.base import Context
        from onemarket.catalogs.opennebula import OpenNebulaCatalog
        from onemarket.installation import Installation

        driverlog.stream = open("/dev/null", "w")  # noqa: SIM115 - lives as long as the child
        base = Path(cache_dir)
        inst = Installation(base, base / "remotes", base / "var", base / "mads")
        market = Market(0, "bench", "one", {"ENDPOINT": endpoint})
        start = time.perf_counter()
        result = OpenNebulaCatalog(market, Context(inst)).monitor()
        text = result.to_template()
        wall = time.perf_counter() - start
        count = text.count("\nAPP=") + text.startswith("APP=")
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "rss_mb": rss_kb / 1024, "apps": count}


# --------------------------------------------------------------------------- parent side


def run_child(mode: str, endpoint: str, cache_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, endpoint, str(cache_dir)],
        capture_output=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    return json.loads(proc.stdout)


def measure(mode: str, endpoint: str, work: Path, repeats: int) -> dict:
    runs = []
    for i in range(repeats):
        cache = work / f"{mode}-{i}"
        cache.mkdir()
        if mode == "monitor-304":
            run_child("monitor", endpoint, cache)
        runs.append(run_child(mode.removesuffix("-304"), endpoint, cache))
    return {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
        "apps": runs[0]["apps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "ENDPOINT", "DIR"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from tests.servers.httpd import StaticHttpServer

    body = CATALOG_PATH.read_bytes()
    large = synthetic(json.loads(body), SCALE)
    server = StaticHttpServer()
    server.routes = {"/shared/appliance": body, "/large/appliance": large}
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="one-monitor-bench-") as tmp:
            work = Path(tmp)
            print(
                f"{'catalog':<16}{'run':<13}{'apps':>6}{'wall s':>10}{'x base':>8}"
                f"{'peak RSS MB':>13}{'x base':>8}"
            )
            for label, path, size in (
                ("shared", "/shared", len(body)),
                (f"{SCALE}x larger", "/large", len(large)),
            ):
                endpoint = server.url + path
                folder = work / path.strip("/")
                folder.mkdir()
                base = measure("baseline", endpoint, folder, args.repeats)
                for mode in ("baseline", "monitor", "monitor-304"):
                    m = (
                        base
                        if mode == "baseline"
                        else measure(mode, endpoint, folder, args.repeats)
                    )
                    print(
                        f"{label:<16}{mode:<13}{m['apps']:>6}{m['wall_s']:>10.3f}"
                        f"{m['wall_s'] / base['wall_s']:>8.2f}{m['rss_mb']:>13.1f}"
                        f"{m['rss_mb'] / base['rss_mb']:>8.2f}"
                    )
                print(f"{'':<16}(catalog answer: {size / 1e6:.2f} MB of JSON)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
