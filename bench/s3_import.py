#!/usr/bin/env python3
"""Benchmark: the s3 backend's import vs boto3's ``upload_file`` on the same Ceph RGW.

Starts a throw-away Ceph RGW on loopback (tests/servers/rgw.py, bluestore on a sparse file by
default), writes one random file (1 GiB by default), then, in each round, uploads it with
boto3's TransferManager (``upload_file``, default TransferConfig, through a client configured
the same way: it sends no checksum of the whole object) and with the s3 backend
(``S3Backend.import_app``, default READ_LENGTH: whole-object MD5, signed payload per part,
metadata), and runs ``md5sum`` on it (the floor: one MD5 of every byte). Each upload runs in
its own child process so its peak RSS is its own. Prints each round, then medians: throughput
ratio ours / upload_file (target >= 1.0), client CPU, the Ceph daemons' CPU during each upload
(read from /proc), our peak RSS (target <= 150 MB).
RGW runs on the same machine: its CPU (it MD5s every part for the ETag and checks each
signed payload) competes with the client's, so the load average is printed too. With
``--split-cpus`` the Ceph daemons run on the last CPU and the clients (and md5sum) on the
others, as when RGW is another machine: each side's CPU is its own.

    .venv/bin/python bench/s3_import.py [--size-mb 1024] [--rounds 5] [--store bluestore]
                                        [--split-cpus]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

from _common import load_average, machine_line, write_random  # noqa: E402

MIB = 1 << 20
TARGET_RATIO = 1.0
TARGET_RSS_MB = 150


def market_attrs(endpoint: str, access: str, secret: str, bucket: str) -> dict[str, str]:
    return {
        "ACCESS_KEY_ID": access,
        "SECRET_ACCESS_KEY": secret,
        "REGION": "us-east-1",
        "BUCKET": bucket,
        "ENDPOINT": endpoint,
        "FORCE_PATH_STYLE": "YES",
        "AWS": "no",
    }


def child(mode: str, attrs: dict[str, str], path: str, app_id: int) -> None:
    """One upload in this process (market attributes, secret included, come on stdin, never
    on the command line); prints seconds and peak RSS as JSON."""
    from onemarket.action import App, ImportInfo, Market
    from onemarket.backends.base import Context, ImportRequest
    from onemarket.backends.s3 import S3Backend
    from onemarket.installation import Installation
    from onemarket.s3config import make_client

    market = Market(id=1, name="bench", driver="s3", attrs=attrs)
    start = time.monotonic()
    if mode == "ours":
        inst = Installation.detect()
        backend = S3Backend(market, Context(installation=inst))
        backend.import_app(
            ImportRequest(app=App(id=app_id, name="bench"), source=ImportInfo(source=path))
        )
    else:
        client = make_client(market)
        client.upload_file(path, attrs["BUCKET"], f"baseline-{app_id}")
    seconds = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime
    print(json.dumps({"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu_s": cpu_s}))


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads made later inherit their maker's set)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def split_cpus(server: object) -> str:
    """Ceph's daemons on the last CPU, this process and its children on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "one CPU: not split"
    for pid_file in Path(server.run_dir).glob("*.pid"):  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError):
            pin(int(pid_file.read_text().split()[0]), {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    return f"Ceph on CPU {cpus[-1]}, clients on CPU {','.join(map(str, cpus[:-1]))}"


def ceph_cpu_s(server: object) -> float:
    """User + system CPU seconds the Ceph daemons (mon, osd, rgw) have used so far: what the
    server spends on an upload is the difference around it."""
    total = 0
    for pid_file in Path(server.run_dir).glob("*.pid"):  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def run_child(mode: str, attrs: dict[str, str], path: Path, app_id: int) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", mode, "--path", str(path), "--app-id", str(app_id)]
    proc = subprocess.run(
        argv,
        input=json.dumps(attrs).encode(),
        capture_output=True,
        timeout=1800,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        sys.exit(f"{mode} upload failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--read-length", help="READ_LENGTH of the market (MB; default unset)")
    parser.add_argument("--store", choices=("bluestore", "memstore"), default="bluestore")
    parser.add_argument(
        "--split-cpus", action="store_true", help="Ceph on the last CPU, clients on the others"
    )
    parser.add_argument("--child", choices=("ours", "baseline"))
    parser.add_argument("--path")
    parser.add_argument("--app-id", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(sys.stdin.read()), args.path, args.app_id)
        return

    from onemarket.action import Market
    from onemarket.s3config import make_client

    from tests.servers.rgw import CephRgw

    with tempfile.TemporaryDirectory(prefix="onemarket-bench-") as tmp:
        image = Path(tmp) / "image.raw"
        write_random(image, args.size_mb * MIB)
        server = CephRgw(store=args.store, store_bytes=max(32 << 30, 8 * args.size_mb * MIB))
        server.start()
        print(f"Ceph RGW ({args.store}) ready in {server.startup_s:.1f} s at {server.endpoint}")
        if args.split_cpus:
            print(split_cpus(server))
        try:
            attrs = market_attrs(server.endpoint, server.access_key, server.secret_key, "bench")
            if args.read_length:
                attrs["READ_LENGTH"] = args.read_length
            client = make_client(Market(id=1, name="bench", driver="s3", attrs=attrs))
            client.create_bucket(Bucket="bench")
            ours: list[dict[str, float]] = []
            base: list[dict[str, float]] = []
            md5sum: list[float] = []
            load_before = load_average()
            for n in range(args.rounds):
                start = time.monotonic()
                subprocess.run(["md5sum", str(image)], check=True, capture_output=True)
                md5sum.append(time.monotonic() - start)
                for mode, results in (("baseline", base), ("ours", ours)):
                    server_before = ceph_cpu_s(server)
                    r = run_child(mode, attrs, image, n)
                    r["server_cpu_s"] = ceph_cpu_s(server) - server_before
                    for key in (f"marketapp-{n}", f"baseline-{n}"):
                        client.delete_object(Bucket="bench", Key=key)
                    results.append(r)
                    rate = args.size_mb / r["seconds"]
                    print(
                        f"round {n + 1} {mode:8s} {r['seconds']:6.2f} s  {rate:7.1f} MiB/s  "
                        f"peak RSS {r['rss_mb']:.0f} MB  client CPU {r['cpu_s']:.1f} s  "
                        f"server CPU {r['server_cpu_s']:.1f} s"
                    )
        finally:
            server.stop()
    med = statistics.median
    t_ours, t_base = med(r["seconds"] for r in ours), med(r["seconds"] for r in base)
    ratio = med(b["seconds"] / o["seconds"] for b, o in zip(base, ours, strict=True))
    rss = max(r["rss_mb"] for r in ours)
    print(machine_line(load_before, args.rounds, "rounds"))
    print(
        f"  md5sum {med(md5sum):.2f} s | upload_file {t_base:.2f} s "
        f"({args.size_mb / t_base:.0f} MiB/s, CPU {med(r['cpu_s'] for r in base):.1f} s, "
        f"RSS {max(r['rss_mb'] for r in base):.0f} MB) | ours {t_ours:.2f} s "
        f"({args.size_mb / t_ours:.0f} MiB/s, CPU {med(r['cpu_s'] for r in ours):.1f} s, "
        f"RSS {rss:.0f} MB)"
    )
    print(
        f"  client + server CPU: upload_file "
        f"{med(r['cpu_s'] + r['server_cpu_s'] for r in base):.1f} s, ours "
        f"{med(r['cpu_s'] + r['server_cpu_s'] for r in ours):.1f} s "
        f"(the machine offers {os.cpu_count()} CPU-seconds per second of wall time)"
    )
    print(
        f"  throughput ours / upload_file = {ratio:.2f} (median of rounds; target >= "
        f"{TARGET_RATIO}); ours / md5sum time = {t_ours / med(md5sum):.2f}; "
        f"peak RSS {rss:.0f} MB (target <= {TARGET_RSS_MB})"
    )
    ok = ratio >= TARGET_RATIO and rss <= TARGET_RSS_MB
    print("targets met" if ok else "targets NOT met")


if __name__ == "__main__":
    main()
