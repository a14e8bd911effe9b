#!/usr/bin/env python3
"""Round trip of MONITOR requests through the one_market MAD, against interpreter starts.

Installs the drivers into a temporary ONE_LOCATION (``install.sh -d DIR -P <this python>``),
starts the MAD as oned does, and sends REQUESTS sequential MONITOR requests of an http market
whose PUBLIC_DIR is a temporary folder, timing each request from write to reply. In the same
run it measures two baselines: starting ``python -c pass`` once per request (the interpreter
start the stock MAD pays for every action) and running our ``monitor`` script directly (what
our action costs under the stock MAD). Prints medians, ratios and the MAD's peak RSS.

    .venv/bin/python bench/mad_monitor.py [--requests 200]
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_MEDIAN_MS = 50.0
REPLY_TIMEOUT_S = 30.0


def payload(public_dir: Path) -> str:
    doc = (
        "<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><ID>100</ID><NAME>bench</NAME>"
        "<MARKET_MAD>http</MARKET_MAD><TEMPLATE><BASE_URL>http://127.0.0.1:9/</BASE_URL>"
        f"<PUBLIC_DIR>{public_dir}</PUBLIC_DIR></TEMPLATE></MARKETPLACE>"
        "</MARKET_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(doc.encode()).decode()


def read_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], REPLY_TIMEOUT_S)
    if not ready:
        sys.exit(f"no reply from the MAD within {REPLY_TIMEOUT_S} s")
    line = proc.stdout.readline().decode()
    if not line:
        sys.exit("the MAD exited")
    return line


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_mad(root: Path, b64: str, count: int) -> tuple[list[float], float, str]:
    env = dict(os.environ, ONE_LOCATION=str(root))
    proc = subprocess.Popen(
        [str(root / "lib" / "mads" / "one_market"), "-t 15 -m http"],  # one word, as oned
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"INIT\n")
    proc.stdin.flush()
    assert read_line(proc) == "INIT SUCCESS\n"
    times: list[float] = []
    first = ""
    for i in range(count):
        start = time.perf_counter()
        proc.stdin.write(f"MONITOR  {i} {b64}\n".encode())
        proc.stdin.flush()
        line = read_line(proc)
        while line.startswith("LOG "):
            line = read_line(proc)
        times.append(time.perf_counter() - start)
        if not line.startswith(f"MONITOR SUCCESS {i} "):
            sys.exit(f"unexpected reply: {line.strip()[:200]}")
        first = first or line
    rss = peak_rss_mb(proc.pid)
    proc.stdin.write(b"FINALIZE\n")
    proc.stdin.close()
    if proc.wait(timeout=REPLY_TIMEOUT_S) != 0:
        sys.exit("the MAD did not exit 0 on FINALIZE")
    monitor = base64.b64decode(first.split()[3]).decode().replace("\n", " ")
    return times, rss, monitor


def bench_command(command: list[str], count: int, env: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return times


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mad-bench-") as tmp:
        root = Path(tmp) / "one"
        public = Path(tmp) / "public"
        public.mkdir()
        subprocess.run(
            [str(REPO / "install.sh"), "-d", str(root), "-P", sys.executable],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        b64 = payload(public)
        mad, rss, monitor = bench_mad(root, b64, args.requests)
        interp = bench_command([sys.executable, "-c", "pass"], args.requests)
        script = root / "var" / "remotes" / "market" / "http" / "monitor"
        env = dict(os.environ, ONE_LOCATION=str(root))
        direct = bench_command([str(script), b64, "0"], min(args.requests, 50), env)
    n = args.requests
    p90 = statistics.quantiles(mad, n=10)[-1] * 1000
    print(f"monitor output: {monitor}")
    print(f"MAD round trip, {n} sequential MONITOR (http):  median {ms(mad):6.1f} ms")
    print(f"                                                p90    {p90:6.1f} ms")
    print(f"baseline: python -c pass per request ({n}):     median {ms(interp):6.1f} ms")
    print(f"baseline: our monitor script run directly:      median {ms(direct):6.1f} ms")
    print(f"ratio MAD / interpreter start: {ms(mad) / ms(interp):.2f}")
    print(f"ratio MAD / script per action: {ms(mad) / ms(direct):.2f}")
    print(f"MAD peak RSS: {rss:.1f} MB")
    met = "met" if ms(mad) < TARGET_MEDIAN_MS else "MISSED"
    print(f"target median < {TARGET_MEDIAN_MS:.0f} ms: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
