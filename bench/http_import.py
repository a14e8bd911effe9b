#!/usr/bin/env python3
"""Import of a large random file into an http market, against ``cp`` and ``md5sum``.

Writes SIZE MiB of random data to a scratch folder, then times, in the same run, alternating,
on the same (page-cached) file: ``cp`` to the same filesystem, ``md5sum``, and our import
action (``python -m onemarket.runner http import``: interpreter start, read, MD5, sparse write,
fsync, rename). Prints the median of each over the runs, the median of the per-run ratios, CPU
times, the importer's peak RSS (from ``wait4``) and the load average (the machine may be
shared: CPU time is the steadier figure then).

Target (issue 15): import <= 1.15 x max(cp, md5sum): MD5 cannot be split, so a verified import
is bounded by md5sum; everything else runs on another core. Peak RSS < 100 MB.

    .venv/bin/python bench/http_import.py [--size-mib 1024] [--dir /var/tmp] [--runs 5]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRITE_CHUNK_BYTES = 8 << 20
"""Chunk used to write the random test file (8 MiB of memory)."""
TARGET_RATIO = 1.15
TARGET_RSS_MB = 100.0


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    stdout: bytes
    cpu_s: float = 0.0
    """User + system CPU time: less sensitive than wall time to other load on the machine."""


def timed(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``argv``; wall time and peak RSS of that one child (``wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = b"", b""
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return Run(seconds, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime)


def random_file(path: Path, size_bytes: int) -> None:
    with path.open("wb") as f:
        left = size_bytes
        while left > 0:
            n = min(left, WRITE_CHUNK_BYTES)
            f.write(os.urandom(n))
            left -= n


def import_payload(source: Path, public_dir: Path, app_id: int = 1) -> str:
    doc = (
        "<MARKET_DRIVER_ACTION_DATA>"
        "<MARKETPLACE><ID>100</ID><NAME>bench</NAME><MARKET_MAD>http</MARKET_MAD><TEMPLATE>"
        f"<BASE_URL>http://127.0.0.1:9/market</BASE_URL><PUBLIC_DIR>{public_dir}</PUBLIC_DIR>"
        "</TEMPLATE></MARKETPLACE>"
        f"<MARKETPLACEAPP><ID>{app_id}</ID><NAME>bench</NAME><TYPE>1</TYPE></MARKETPLACEAPP>"
        f"<IMPORT_SOURCE>{source}</IMPORT_SOURCE><MD5></MD5><SIZE>0</SIZE>"
        "<FORMAT>raw</FORMAT><DISPOSE>NO</DISPOSE><DISPOSE_CMD></DISPOSE_CMD>"
        "</MARKET_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(doc.encode()).decode()


def run_import(source: Path, public_dir: Path) -> Run:
    """Our import action, as the MAD would run it; the imported file is removed afterwards."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"))
    payload = import_payload(source, public_dir)
    return timed([sys.executable, "-m", "onemarket.runner", "http", "import", payload, "1"], env)


def empty(folder: Path) -> None:
    """Remove what a command wrote and flush the disk, so the next command does not pay for
    the previous one's write-back (cp returns before its data reaches the disk)."""
    for p in folder.iterdir():
        p.unlink()
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the random file")
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder (needs 2 x size free)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each command (median is kept)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="onemarket-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        src = root / "image.raw"
        public = root / "public"
        public.mkdir()
        print(f"writing {args.size_mib} MiB of random data to {src}")
        random_file(src, args.size_mib << 20)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm cache
        runs: dict[str, list[Run]] = {"cp": [], "md5sum": [], "import": []}
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            for name, argv in (
                ("cp", ["cp", str(src), str(public / "copy")]),
                ("md5sum", ["md5sum", str(src)]),
            ):
                runs[name].append(timed(argv))
                empty(public)
            runs["import"].append(run_import(src, public))
            empty(public)
        med = statistics.median
        mib = args.size_mib
        print(
            f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after; {args.runs} runs, medians:"
        )
        for name, rs in runs.items():
            secs = med(r.seconds for r in rs)
            cpu = med(r.cpu_s for r in rs)
            rss = max(r.peak_rss_mb for r in rs)
            print(
                f"{name:8s} {secs:8.2f} s  {mib / secs:8.1f} MiB/s  "
                f"cpu {cpu:6.2f} s  rss {rss:6.1f} MB"
            )
        pairs = list(zip(runs["cp"], runs["md5sum"], runs["import"], strict=True))
        ratio = med(i.seconds / max(c.seconds, m.seconds) for c, m, i in pairs)
        print(f"import / cp              = {med(i.seconds / c.seconds for c, _, i in pairs):.2f}")
        print(f"import / md5sum          = {med(i.seconds / m.seconds for _, m, i in pairs):.2f}")
        print(f"import / max(cp, md5sum) = {ratio:.2f}  (median of runs; target <= {TARGET_RATIO})")
        cpu_ratio = med(i.cpu_s / m.cpu_s for _, m, i in pairs)
        print(f"import CPU / md5sum CPU  = {cpu_ratio:.2f}")
        rss = max(r.peak_rss_mb for r in runs["import"])
        print(f"import peak RSS          = {rss:.1f} MB  (target < {TARGET_RSS_MB:.0f})")
        ok = ratio <= TARGET_RATIO and rss < TARGET_RSS_MB
        print("targets met" if ok else "targets NOT met")
        shutil.rmtree(public, ignore_errors=True)


if __name__ == "__main__":
    main()
