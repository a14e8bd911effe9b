#!/usr/bin/env python3
"""Import of a large sparse file into an http market, against ``cp --sparse=always``.

Builds a SIZE MiB sparse file holding DATA MiB of random data in EXTENTS runs spread over it,
then times, in the same run: ``cp --sparse=always``, ``md5sum`` (which, like our import, must
read every byte, zeros included) and our import action. Prints times, allocated blocks of each
copy, the ratios and the importer's peak RSS.

Target (issue 3): same blocks allocated as cp, time within 2 x. MD5 must cover all SIZE bytes,
so the import time is bounded below by hashing SIZE bytes of zeros: the ratio against
``md5sum`` of the same file is printed too.

    .venv/bin/python bench/http_sparse.py [--size-mib 8192] [--data-mib 64] [--extents 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_import import Run, empty, run_import, timed

TARGET_TIME_RATIO = 2.0


def sparse_file(path: Path, size_mib: int, data_mib: int, extents: int) -> None:
    """``size_mib`` MiB, ``data_mib`` MiB of it random data in ``extents`` evenly spread runs."""
    size = size_mib << 20
    extent = (data_mib << 20) // extents
    stride = size // extents
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(extents):
            f.seek(i * stride + (stride - extent) // 2)
            f.write(os.urandom(extent))


def allocated_kib(path: Path) -> int:
    return path.stat().st_blocks // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=8192, help="apparent size of the file")
    ap.add_argument("--data-mib", type=int, default=64, help="random data it holds")
    ap.add_argument("--extents", type=int, default=64, help="runs the data is split into")
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="onemarket-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        src = root / "sparse.raw"
        public = root / "public"
        public.mkdir()
        sparse_file(src, args.size_mib, args.data_mib, args.extents)
        print(
            f"source: {args.size_mib} MiB apparent, {allocated_kib(src)} KiB allocated "
            f"({args.extents} extents)"
        )
        cp_dst = public / "copy"
        cp = timed(["cp", "--sparse=always", str(src), str(cp_dst)])
        # Flushed first: delayed allocation hides blocks (extent tree) until written back.
        timed(["sync", "--", str(cp_dst)])
        cp_blocks = allocated_kib(cp_dst)
        empty(public)
        md5sum = timed(["md5sum", str(src)])
        imp: Run = run_import(src, public)
        (imported,) = list(public.iterdir())
        imp_blocks = allocated_kib(imported)
        size_ok = imported.stat().st_size == src.stat().st_size
        empty(public)
        mib = args.size_mib
        for name, r in (("cp", cp), ("md5sum", md5sum), ("import", imp)):
            rate = mib / r.seconds
            print(
                f"{name:8s} {r.seconds:8.2f} s  {rate:8.1f} MiB/s  cpu {r.cpu_s:6.2f} s  "
                f"rss {r.peak_rss_mb:6.1f} MB"
            )
        print(f"allocated: cp {cp_blocks} KiB, import {imp_blocks} KiB, size ok: {size_ok}")
        ratio = imp.seconds / cp.seconds
        print(f"import / cp --sparse=always = {ratio:.2f}  (target <= {TARGET_TIME_RATIO})")
        print(f"import / md5sum             = {imp.seconds / md5sum.seconds:.2f}")
        print(f"import peak RSS             = {imp.peak_rss_mb:.1f} MB")
        blocks_ok = imp_blocks <= cp_blocks
        print(f"blocks: {'same or fewer than cp' if blocks_ok else 'MORE than cp'}")
        print("targets met" if blocks_ok and ratio <= TARGET_TIME_RATIO else "targets NOT met")


if __name__ == "__main__":
    main()
