"""``one-market mirror SOURCE DEST``: the subcommand (arguments, the run, its report).

A run: read SOURCE's catalog as its driver does and decide what to fetch (``plan``); download
what is neither published nor staged yet, ``--jobs`` at a time (``fetch``); publish the staged
files and the catalog in one short step (``store``); optionally ``--prune``. An entry whose
files cannot be fetched and verified is reported and left out, or keeps its previous, still
valid, copy; the exit status is then 1. SIGINT, SIGTERM and SIGHUP stop the downloads, remove
what they were writing and leave the previous mirror as it was.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..action import Market
from ..catalogs.linuxcontainers import LinuxContainersCatalog
from ..catalogs.opennebula import OpenNebulaCatalog
from ..catalogs.opennebula import user_agent as one_user_agent
from ..errors import ConfigError, one_line
from ..installation import Installation
from ..markets import load_market
from ..transfer.interrupt import interruptible, signals_to_main_thread
from ..web import make_session
from .fetch import EntryResult, Fetcher
from .model import MirrorEntry, Plan, Previous, Selection
from .plan import make_plan
from .report import (
    STATUS_FAILED,
    STATUS_KEPT,
    STATUS_MIRRORED,
    STATUS_UNCHANGED,
    Outcome,
    Reporter,
    summary,
)
from .report import dry_run as print_dry_run
from .store import LocalStore

if TYPE_CHECKING:
    from .s3target import S3Target

DEFAULT_JOBS = 4
"""Parallel downloads; each holds at most ~9 MiB of buffers (the copy engine's queues)."""
MAX_JOBS = 32
POLL_S = 0.2
"""How often the main thread wakes while downloads run (progress redraw, signals)."""
DEFAULT_SUB_PATH = "mirror"
"""Folder under an http marketplace's PUBLIC_DIR, or key prefix in an s3 marketplace's
bucket, receiving the tree (``--to-market``)."""
VERSION_RE = re.compile(r"\d{1,3}\.\d{1,3}(\.\d{1,4}){0,2}")
"""An OpenNebula version as the catalog server reads it from the User-Agent (``7.0``)."""


def add_mirror_parser(
    sub: Any, common: argparse.ArgumentParser, installation: Callable[[], Installation]
) -> None:
    """Register ``mirror`` on the ``one-market`` subparsers (``installation`` gives the cache)."""
    p = sub.add_parser(
        "mirror",
        parents=[common],
        help="copy a public marketplace (one, linuxcontainers) into a folder to serve offline",
        description="Copy the apps a one or linuxcontainers marketplace publishes (its "
        "filters applied) into DEST, a folder a plain web server serves as the original "
        "catalog. Verified, incremental, resumable; the catalog is replaced last.",
    )
    p.add_argument("source", metavar="SOURCE", help="marketplace id, name or template file")
    p.add_argument("dest", metavar="DEST", nargs="?", help="local folder receiving the tree")
    p.add_argument(
        "--to-market",
        metavar="MARKET",
        help="an http or s3 marketplace (id, name or template): the tree goes under its "
        "PUBLIC_DIR or into its bucket (DEST, if given, is then the local working copy)",
    )
    p.add_argument(
        "--sub-path",
        default=DEFAULT_SUB_PATH,
        help=f"folder under PUBLIC_DIR or key prefix in the bucket for --to-market "
        f"(default: {DEFAULT_SUB_PATH})",
    )
    p.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="app names to mirror"
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="app names to leave out"
    )
    p.add_argument("--name-suffix", default="", metavar="TEXT", help="appended to app names")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    p.add_argument("--prune", action="store_true", help="remove files no entry names any more")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N", help="parallel downloads")
    p.add_argument(
        "--one-version",
        metavar="X.Y",
        help="OpenNebula version whose list a one catalog answers (default: the installed one)",
    )
    p.add_argument("--url", help="URL at which DEST will be served (for the printed template)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=lambda args: run(args, installation()))


# ----------------------------------------------------------------------------- the run


def resolve_dest(
    args: argparse.Namespace, installation: Installation
) -> tuple[Path, str, S3Target | None]:
    """The folder receiving the tree, the URL it is served at ("" when unknown) and, for an s3
    marketplace, the bucket prefix the folder (a working copy) is uploaded to."""
    if args.to_market:
        target = load_market(args.to_market)
        if target.driver not in ("http", "s3"):
            raise ConfigError(
                f"--to-market '{target.name}' is a {target.driver} marketplace: only http "
                "and s3 marketplaces can receive a mirror"
            )
        sub_path = args.sub_path.strip("/")
        if not sub_path or any(p in ("", ".", "..") for p in sub_path.split("/")):
            raise ConfigError(f"--sub-path {args.sub_path!r} must be a relative folder")
        if target.driver == "s3":
            from .s3target import S3Target, working_copy  # boto3: only when needed

            s3 = S3Target(target, installation, sub_path, (args.url or "").strip())
            dest = Path(args.dest) if args.dest else working_copy(installation, s3)
            return dest, s3.url, s3
        if args.dest:
            raise ConfigError("give DEST or --to-market, not both")
        if (target.attr("BRIDGE_LIST") or "").strip():
            raise ConfigError(
                f"--to-market '{target.name}' keeps PUBLIC_DIR on BRIDGE_LIST hosts: mirror "
                "into a local folder and copy it there"
            )
        public_dir = (target.attr("PUBLIC_DIR") or "").strip()
        base_url = (target.attr("BASE_URL") or "").strip().rstrip("/")
        if not public_dir or not base_url:
            raise ConfigError(f"--to-market '{target.name}' lacks PUBLIC_DIR or BASE_URL")
        return Path(public_dir) / sub_path, f"{base_url}/{sub_path}/", None
    if not args.dest:
        raise ConfigError("no DEST folder given (or --to-market)")
    return Path(args.dest), (args.url or "").strip(), None


def user_agent_for(market: Market, installation: Installation, version: str | None) -> str:
    """The driver's own User-Agent (the `one` server picks its list by it), or --one-version's."""
    if version:
        return one_user_agent(version)
    from ..backends.base import Context

    reader = OpenNebulaCatalog if market.driver == "one" else LinuxContainersCatalog
    return reader(market, Context(installation)).user_agent()


def run(args: argparse.Namespace, installation: Installation) -> int:
    if not 1 <= args.jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs must be between 1 and {MAX_JOBS}")
    if args.one_version is not None and not VERSION_RE.fullmatch(args.one_version):
        raise ConfigError(f"--one-version {one_line(args.one_version, 40)!r}: expected X.Y")
    market = load_market(args.source)
    dest, served_at, s3 = resolve_dest(args, installation)
    selection = Selection(tuple(args.include), tuple(args.exclude), args.name_suffix)
    agent = user_agent_for(market, installation, args.one_version)
    session = make_session(agent)
    try:
        plan = make_plan(market, session, installation, selection)
    finally:
        session.close()
    if not plan.entries:
        raise ConfigError(
            f"nothing to mirror from {plan.source_url}: the filters and selection leave no app"
        )
    store = LocalStore(dest)
    if args.dry_run:
        return dry_run(args, plan, store)
    with interruptible(f"mirror into {dest}"), store.locked():
        outcome = mirror(args, plan, store, agent)
        if s3 is not None:  # the working copy is a valid mirror, whatever failed
            outcome.upload = s3.upload(store, plan.format.files, args.prune)
    summary(args, market, outcome, served_at)
    return 0 if outcome.ok else 1


def _todo(plan: Plan, store: LocalStore) -> list[MirrorEntry]:
    return [e for e in plan.entries if not all(store.exists(f) for f in e.files)]


def _in_place_status(entry: MirrorEntry, previous: Previous) -> str:
    """Status of an entry whose files are all published: unchanged, unless the entry is new
    or its catalog document differs."""
    same = previous.get(entry.key, ({}, []))[0] == entry.doc
    return STATUS_UNCHANGED if same else STATUS_MIRRORED


def _fetch_bytes(entry: MirrorEntry, store: LocalStore) -> int:
    return sum(f.size or 0 for f in entry.files if not store.exists(f) and not store.staged(f))


def mirror(args: argparse.Namespace, plan: Plan, store: LocalStore, agent: str) -> Outcome:
    outcome = Outcome(plan, store.root, requests=plan.catalog_fetches + plan.ranged_requests)
    names = plan.format.files
    previous = plan.format.previous(store.read_catalogs(names))
    todo = _todo(plan, store)
    todo_keys = {e.key for e in todo}
    reporter = Reporter(
        sys.stderr, args.quiet, sum(_fetch_bytes(e, store) for e in todo), len(plan.entries)
    )
    for entry in plan.entries:
        if entry.key not in todo_keys:
            status = _in_place_status(entry, previous)
            outcome.status[entry.key] = status
            reporter.entry(status, entry)
    cancel = threading.Event()
    fetcher = Fetcher(store, agent, cancel, reporter)
    results: list[EntryResult] = []

    try:
        with ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="mirror") as pool:
            futures: dict[Future[EntryResult], MirrorEntry] = {}
            try:  # a signal held while the threads start is raised inside: the jobs are ended
                with signals_to_main_thread():  # the pool starts its threads here
                    for e in todo:
                        futures[pool.submit(fetcher.fetch_entry, e)] = e
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
                    for future in done:
                        result = future.result()
                        results.append(result)
                        _record(outcome, result, previous, store, reporter)
                    reporter.draw()
            except BaseException:
                fetcher.abort()  # threads stop at once; the pool waits for them
                for future in futures:
                    future.cancel()
                raise
    finally:
        reporter.close()
        fetcher.close()
    outcome.requests += fetcher.requests
    docs = []
    keep: list[str] = list(names)
    for entry in plan.entries:
        status = outcome.status[entry.key]
        if status in (STATUS_MIRRORED, STATUS_UNCHANGED):
            docs.append((entry.key, entry.doc))
            keep += [f.path for f in entry.files]
        elif status == STATUS_KEPT:
            doc, paths = previous[entry.key]
            docs.append((entry.key, doc))
            keep += paths
    staged = [f for r in results if r.ok for f in r.staged]
    left_staged = [f for r in results if not r.ok for f in r.staged]
    store.publish(staged, plan.format.build(plan.top, docs))
    if args.prune:
        outcome.pruned = store.prune(keep, left_staged)
    return outcome


def _record(
    outcome: Outcome,
    result: EntryResult,
    previous: Previous,
    store: LocalStore,
    reporter: Reporter,
) -> None:
    entry = result.entry
    outcome.bytes += result.bytes
    outcome.downloads += len(result.fetched)
    if result.ok:
        outcome.status[entry.key] = STATUS_MIRRORED
        reporter.entry(STATUS_MIRRORED, entry)
        return
    outcome.errors[entry.key] = result.error
    prev = previous.get(entry.key)
    if prev is not None and store.valid(prev[1]):
        outcome.status[entry.key] = STATUS_KEPT
        reporter.entry("FAILED (previous copy kept)", entry, result.error)
    else:
        outcome.status[entry.key] = STATUS_FAILED
        reporter.entry("FAILED (left out)", entry, result.error)


def dry_run(args: argparse.Namespace, plan: Plan, store: LocalStore) -> int:
    rows = []
    total = 0
    previous = plan.format.previous(store.read_catalogs(plan.format.files))
    for entry in plan.entries:
        fetch = _fetch_bytes(entry, store)
        total += fetch
        in_place = all(store.exists(f) for f in entry.files)
        unchanged = in_place and _in_place_status(entry, previous) == STATUS_UNCHANGED
        rows.append(
            {
                "name": entry.label,
                "version": entry.version,
                "files": len(entry.files),
                "size": entry.size_bytes,
                "fetch_bytes": fetch,
                "status": STATUS_UNCHANGED if unchanged else "fetch",
            }
        )
    print_dry_run(args.json, rows, total, store.root)
    return 0
