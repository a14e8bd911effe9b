#!/usr/bin/env python3
"""Benchmark: the s3 backend's import vs boto3's ``upload_file`` on the same Ceph RGW.

Starts a throw-away Ceph RGW on loopback (tests/servers/rgw.py, bluestore on a sparse file by
default), writes one random file (1 GiB by default), then uploads it alternately with the s3
backend (``S3Backend.import_app``, default READ_LENGTH) and with boto3's TransferManager
(``upload_file``, default TransferConfig) through a client configured the same way. Each
upload runs in its own child process so its peak RSS is its own. Prints the best time of
each, the throughput ratio (ours / TransferManager; target >= 0.9) and our peak RSS (target
under 300 MB).

    .venv/bin/python bench/s3_import.py [--size-mb 1024] [--rounds 2] [--store bluestore]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "lib"))

MIB = 1 << 20
TARGET_RATIO = 0.9
TARGET_RSS_MB = 300


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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--store", choices=("bluestore", "memstore"), default="bluestore")
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
        with image.open("wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(MIB))
        server = CephRgw(store=args.store, store_bytes=max(32 << 30, 8 * args.size_mb * MIB))
        server.start()
        print(f"Ceph RGW ({args.store}) ready in {server.startup_s:.1f} s at {server.endpoint}")
        try:
            attrs = market_attrs(server.endpoint, server.access_key, server.secret_key, "bench")
            client = make_client(Market(id=1, name="bench", driver="s3", attrs=attrs))
            client.create_bucket(Bucket="bench")
            ours: list[dict[str, float]] = []
            base: list[dict[str, float]] = []
            for n in range(args.rounds):
                for mode, results in (("baseline", base), ("ours", ours)):
                    r = run_child(mode, attrs, image, n)
                    for key in (f"marketapp-{n}", f"baseline-{n}"):
                        client.delete_object(Bucket="bench", Key=key)
                    results.append(r)
                    rate = args.size_mb / r["seconds"]
                    print(
                        f"round {n + 1} {mode:8s} {r['seconds']:6.2f} s  {rate:7.1f} MiB/s  "
                        f"peak RSS {r['rss_mb']:.0f} MB  client CPU {r['cpu_s']:.1f} s"
                    )
        finally:
            server.stop()
    best_ours = min(r["seconds"] for r in ours)
    best_base = min(r["seconds"] for r in base)
    ratio = best_base / best_ours
    paired = sorted(b["seconds"] / o["seconds"] for b, o in zip(base, ours, strict=True))
    median = paired[len(paired) // 2]
    rss = max(r["rss_mb"] for r in ours)
    print(
        f"size {args.size_mb} MiB: ours {args.size_mb / best_ours:.1f} MiB/s, "
        f"upload_file {args.size_mb / best_base:.1f} MiB/s"
    )
    print(
        f"throughput ratio ours/upload_file = {ratio:.2f} best of each, {median:.2f} median "
        f"of rounds (target >= {TARGET_RATIO}); "
        f"our peak RSS {rss:.0f} MB (target < {TARGET_RSS_MB} MB); "
        f"upload_file peak RSS {max(r['rss_mb'] for r in base):.0f} MB"
    )


if __name__ == "__main__":
    main()
