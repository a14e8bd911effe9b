"""What the benchmarks share: timing a command (a baseline or our action), random test files,
medians and the machine's load, and running our http import action as the MAD would.

The benchmarks run as scripts (``.venv/bin/python bench/<name>.py``), so this folder is on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.randomdata import write_random  # noqa: E402 - after the repository is on the path

STDERR_TAIL_CHARS = 800
"""How much of a failed command's stderr the benchmark prints before it stops."""


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    stdout: bytes
    cpu_s: float = 0.0
    """User + system CPU time: less sensitive than wall time to other load on the machine."""


def timed(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Run:
    """Run ``argv``; wall time, CPU time and peak RSS of that one child (``wait4``). Stops the
    benchmark when the command fails (a figure of a failed run means nothing)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file: a chatty stderr cannot block the child
        proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=err, env=None if env is None else dict(env)
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-STDERR_TAIL_CHARS:]
            sys.exit(f"{' '.join(argv[:3])} failed ({proc.returncode}): {tail}")
    return Run(seconds, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime)


def random_image(path: Path, size_mib: int) -> None:
    """A random file of ``size_mib`` MiB, read once so that every command finds it in the page
    cache (the baselines and our action then read the same cached bytes)."""
    print(f"writing {size_mib} MiB of random data to {path}")
    write_random(path, size_mib << 20)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


@contextlib.contextmanager
def scratch(folder: str) -> Iterator[Path]:
    """A temporary folder below ``folder`` holding an empty ``public`` (the PUBLIC_DIR of the
    http market imported into); removed with everything in it afterwards."""
    with tempfile.TemporaryDirectory(prefix="onemarket-bench-", dir=folder) as tmp:
        root = Path(tmp)
        (root / "public").mkdir()
        yield root


def empty(folder: Path) -> None:
    """Remove what a command wrote and flush the disk, so the next command does not pay for
    the previous one's write-back (cp returns before its data reaches the disk)."""
    for p in folder.iterdir():
        p.unlink()
    os.sync()


def load_average() -> float:
    """The 1-minute load average: the machine may be shared, so every result names it."""
    return os.getloadavg()[0]


def machine_line(load_before: float, runs: int, what: str = "runs") -> str:
    """``machine: <CPUs>, load average <before> before, <now> after; <runs> runs, medians:``"""
    return (
        f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
        f"{load_average():.1f} after; {runs} {what}, medians:"
    )


def print_medians(runs: Mapping[str, Sequence[Run]], mib: int) -> None:
    """One line a command: median wall time and throughput over ``mib`` MiB, median CPU time,
    the largest peak RSS."""
    med = statistics.median
    for name, rs in runs.items():
        secs = med(r.seconds for r in rs)
        cpu = med(r.cpu_s for r in rs)
        rss = max(r.peak_rss_mb for r in rs)
        print(
            f"{name:8s} {secs:8.2f} s  {mib / secs:8.1f} MiB/s  cpu {cpu:6.2f} s  rss {rss:6.1f} MB"
        )


def import_payload(source: Path, public_dir: Path, app_id: int = 1) -> str:
    """The base64 action data of an http IMPORT of ``source`` into ``public_dir``."""
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
    """Our import action, as the MAD would run it (``python -m onemarket.runner http import``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"))
    payload = import_payload(source, public_dir)
    return timed([sys.executable, "-m", "onemarket.runner", "http", "import", payload, "1"], env)
