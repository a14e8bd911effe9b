#!/usr/bin/env python3
"""``one-market mirror`` throughput against ``curl`` of the same files, and a second run's cost.

A ``one`` catalog of FILES appliances of SIZE MiB of random bytes each (md5 and sha256 in the
catalog, as the OpenNebula marketplaces publish them) is served by nginx on loopback. Timed in
the same run, on the same (page-cached) files, into the same filesystem:

- curl: one ``curl`` process fetching every file (connection reused), no verification;
- curl + md5sum + sha256sum: the same, then both checksums of the downloaded files, which is
  what the mirror does while downloading;
- mirror --jobs 1 and --jobs J: ``python -m onemarket.cli mirror`` into an empty folder
  (verified, staged, fsynced, then published);
- second run: the mirror again, nothing changed: the requests nginx logs (expected: one
  conditional GET of the catalog, answered 304) and the bytes downloaded (expected: none).

    .venv/bin/python bench/mirror.py [--files 4] [--size-mib 256] [--jobs 4] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import timed, write_random  # noqa: E402

from tests.servers.mirror_web import MirrorWeb  # noqa: E402

MIB = 1 << 20


def make_source(tree: Path, files: int, size_bytes: int) -> list[str]:
    """A served ``one`` catalog (appliance.json and its files); the appliance ids."""
    appliances, ids = [], []
    for i in range(files):
        app_id = f"bench-{i}"
        path = tree / "appliance" / app_id / "download" / "0"
        path.parent.mkdir(parents=True)
        md5, sha = write_random(path, size_bytes)
        appliances.append(
            {
                "_id": {"$oid": app_id},
                "name": f"bench {i}",
                "version": "1",
                "format": "qcow2",
                "files": [
                    {
                        "url": f"appliance/{app_id}/download/0",
                        "size": size_bytes,
                        "md5": md5,
                        "checksum": {"md5": md5, "sha256": sha},
                    }
                ],
            }
        )
        ids.append(app_id)
    doc = {"sEcho": 1, "appliances": appliances}
    (tree / "appliance.json").write_text(json.dumps(doc))
    return ids


def log_lines(web: MirrorWeb) -> int:
    try:
        return len((web.root / "access.log").read_text().splitlines())
    except OSError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder (same filesystem for all)")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is not installed")

    scratch = Path(tempfile.mkdtemp(prefix="onemarket-bench-mirror-", dir=args.dir))
    web = MirrorWeb(root=scratch / "nginx", public_dir=scratch / "source")
    try:
        web.tree.mkdir(parents=True)
        ids = make_source(web.tree, args.files, args.size_mib * MIB)
        web.start()
        total_mib = args.files * args.size_mib
        one = scratch / "one"
        (one / "var" / "remotes").mkdir(parents=True)
        (one / "var" / "remotes" / "VERSION").write_text("7.0.0\n")
        env = {**os.environ, "ONE_LOCATION": str(one), "NO_PROXY": "127.0.0.1"}
        env["PYTHONPATH"] = str(REPO / "lib")
        template = scratch / "source.tmpl"
        template.write_text(f'NAME = "bench"\nMARKET_MAD = "one"\nENDPOINT = "{web.url}"\n')

        urls = [f"{web.url}appliance/{i}/download/0" for i in ids]
        out = scratch / "curl"
        out.mkdir()
        argv = ["curl", "--fail", "-sS"]
        for n, url in enumerate(urls):
            argv += ["-o", str(out / str(n)), url]
        curl_s = timed(argv, env).seconds
        files = [str(out / str(n)) for n in range(len(urls))]
        md5_s = timed(["md5sum", *files], env).seconds
        sha_s = timed(["sha256sum", *files], env).seconds
        shutil.rmtree(out)

        results = {}
        for jobs in sorted({1, args.jobs}):
            dest = scratch / f"mirror-{jobs}"
            cmd = [sys.executable, "-m", "onemarket.cli", "mirror", str(template), str(dest)]
            run = timed([*cmd, "--jobs", str(jobs), "--json"], env)
            summary = json.loads(run.stdout)
            assert summary["ok"] and summary["bytes"] == total_mib * MIB, summary
            results[jobs] = run.seconds
        before = log_lines(web)
        dest = scratch / f"mirror-{args.jobs}"
        cmd = [sys.executable, "-m", "onemarket.cli", "mirror", str(template), str(dest)]
        run = timed([*cmd, "--json"], env)
        second_s, second = run.seconds, json.loads(run.stdout)
        requests = log_lines(web) - before
    finally:
        web.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    def rate(seconds: float) -> str:
        return f"{total_mib / seconds:7.0f} MiB/s"

    verify_s = curl_s + md5_s + sha_s
    print(f"{args.files} files x {args.size_mib} MiB = {total_mib} MiB from nginx on loopback")
    print(f"curl                      {curl_s:7.2f} s {rate(curl_s)}")
    print(f"curl + md5sum + sha256sum {verify_s:7.2f} s {rate(verify_s)}")
    for jobs, seconds in results.items():
        print(
            f"mirror --jobs {jobs:<11} {seconds:7.2f} s {rate(seconds)}  "
            f"x{seconds / curl_s:.2f} curl, x{seconds / verify_s:.2f} curl+checksums"
        )
    print(
        f"second run                {second_s:7.2f} s  {requests} request(s) to the source, "
        f"{second['bytes']} bytes and {second['downloads']} files downloaded, "
        f"catalog answered 304: {second['catalog_unchanged']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
