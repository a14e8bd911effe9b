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
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Run,
    empty,
    load_average,
    machine_line,
    print_medians,
    random_image,
    run_import,
    scratch,
    timed,
)

TARGET_RATIO = 1.15
TARGET_RSS_MB = 100.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the random file")
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder (needs 2 x size free)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each command (median is kept)")
    args = ap.parse_args()

    with scratch(args.dir) as root:
        src, public = root / "image.raw", root / "public"
        random_image(src, args.size_mib)
        runs: dict[str, list[Run]] = {"cp": [], "md5sum": [], "import": []}
        load_before = load_average()
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
        print(machine_line(load_before, args.runs))
        print_medians(runs, args.size_mib)
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
