"""The datastore downloader: ``s3://`` read with boto3, ``lxd://`` container disks built here,
every other source handed over.

oned exports a marketplace app into a datastore by running the datastore's ``cp`` action, which
calls ``remotes/datastore/downloader.sh [options] FROM TO`` with the datastore action document
(``<DS_DRIVER_ACTION_DATA>`` holding IMAGE, DATASTORE and, for an export, the MARKETPLACE with its
credentials) base64-encoded in the ``DRV_ACTION`` environment variable. Ceph RGW answers the
stock script's hand-signed curl requests with 403 SignatureDoesNotMatch, so install.sh puts a
wrapper running this module in its place and keeps the original as ``downloader.sh.orig``.

- ``s3://`` sources are read here: a streaming GET with bounded memory, resumed with a ranged GET
  (pinned to the object's ETag) after a dropped connection, the md5/sha256 our importer stores in
  the object's metadata verified on the fly, and the stock script's options honoured (hash of the
  downloaded bytes, gzip/bzip2/xz decompression unless ``-n``, ``-c`` first bytes, tar/zip
  unpacked when TO is a path, ``-l`` rate limit, ``-o`` no retries).
- ``lxd://<ENDPOINT><path>?size=&filesystem=&format=`` (Linux Containers apps) replaces the stock
  ``lxd_downloader.sh``: the rootfs is found in the server's catalog and checked against its
  sha256 and size, the disk is built without root and the context package added
  (:mod:`lxdsource`, :mod:`containerdisk`, :mod:`contextpkg`, :mod:`contextroot`).
- Any other source execs the original script with the same arguments, environment and stdin, so
  nothing changes for any datastore.

A failure is an ``ERROR:`` line plus, on OpenNebula 7.x, its cause unprefixed, the line oned
keeps for the image's error message (:func:`report_failure`). SIGTERM, SIGINT and SIGHUP unwind
(:mod:`transfer.interrupt`), removing partial files; what a SIGKILLed run left is removed by the
next run on the same host (:func:`remove_stale_leftovers`).
"""

from __future__ import annotations

import getopt
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import driverlog
from .errors import (
    ConfigError,
    MarketError,
    PayloadError,
    StorageError,
    UnsafePathError,
    from_os_error,
    one_line,
)
from .location import S3Location
from .transfer.hashing import Verifier
from .transfer.local import TEMP_PREFIX, AtomicFile, owner_tag, sweep_temps
from .transfer.sinks import FileSink, Sink, StdoutSink, umask
from .transfer.sources import (
    RESUME_ATTEMPTS,
    FileSource,
    HttpSource,
    ResumingReader,
    S3Range,
    Source,
    s3_stream_errors,
)
from .transfer.stages import PumpResult, pump
from .units import MAX_INT_DIGITS, parse_int, shown

EXIT_FAILURE = 255
"""Exit status of every failure (the stock script exits -1, seen by callers as 255)."""

STOCK_ENV = "ONE_MARKET_STOCK_DOWNLOADER"
"""Environment variable naming the original downloader (tests, unusual layouts)."""
WRAPPER_MARKER = b"onemarket"
"""Marker install.sh writes in its wrappers: a script carrying it is ours, never the original."""
WRAPPER_PROBE_BYTES = 512
"""Head of a candidate original read to look for the marker (only the first lines matter)."""

DRV_ACTION_ENV = "DRV_ACTION"

_SHORT_OPTS = "m:s:l:c:no"
_LONG_OPTS = ["md5=", "sha1=", "limit=", "max-size=", "nodecomp", "noretry"]
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:/s)?")
_SIZE_RE = re.compile(r"([0-9]+)\s*(b|[kKmMgGtT](?:iB|B)?)?")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


class UsageError(MarketError):
    """The command line is not one the stock downloader would accept."""


@dataclass(frozen=True)
class Options:
    """The stock downloader's command line, parsed."""

    source: str
    dest: str
    hashes: tuple[tuple[str, str], ...] = ()
    """(algorithm, expected hex) from ``-m``/``-s``. The datastore scripts pass both when the
    image has both; the stock script checks only the last one given, this one checks each."""
    nodecomp: bool = False
    limit_bps: float | None = None
    max_size: int | None = None
    noretry: bool = False

    @property
    def to_stdout(self) -> bool:
        return self.dest == "-"


def parse_rate(text: str) -> float:
    """Bytes per second from a curl ``--limit-rate`` value (``500k``, ``10M``, ``1G``)."""
    m = _RATE_RE.fullmatch(text.strip())
    if not m or len(m.group(1)) > MAX_INT_DIGITS or float(m.group(1)) <= 0:
        raise UsageError(f"invalid --limit rate {shown(text)} (bytes per second, suffix k, m or g)")
    return float(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes from a ``head -c`` count (``4096``, ``10K``, ``1MB``, ``2MiB``)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid --max-size {shown(text)} (a number of bytes)")
    try:
        count = parse_int(m.group(1))
    except ValueError as exc:
        raise UsageError(f"invalid --max-size: {exc}") from None
    suffix = m.group(2) or ""
    if suffix == "b":
        return count * 512
    base = 1000 if suffix.endswith("B") and not suffix.endswith("iB") else 1024
    return count * base ** _POWERS[suffix[:1].lower()]


def parse_args(argv: list[str]) -> Options:
    """Parse the stock downloader's options (GNU getopt: options may follow FROM and TO)."""
    try:
        opts, args = getopt.gnu_getopt(argv, _SHORT_OPTS, _LONG_OPTS)
    except getopt.GetoptError as exc:
        raise UsageError(f"Arguments error: {exc}") from None
    values: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    for name, value in opts:
        if name in ("-m", "--md5"):
            hashes["md5"] = value.strip().lower()
        elif name in ("-s", "--sha1"):
            hashes["sha1"] = value.strip().lower()
        elif name in ("-n", "--nodecomp"):
            values["nodecomp"] = True
        elif name in ("-l", "--limit"):
            values["limit_bps"] = parse_rate(value)
        elif name in ("-c", "--max-size"):
            values["max_size"] = parse_size(value)
        elif name in ("-o", "--noretry"):
            values["noretry"] = True
    if len(args) < 2 or not args[0] or not args[1]:
        raise UsageError("Arguments error: usage: downloader.sh [options] FROM TO")
    if hashes and values.get("max_size") is not None:
        raise UsageError("Hash check not supported for partial downloads")
    return Options(source=args[0], dest=args[1], hashes=tuple(hashes.items()), **values)


OUR_SCHEMES = ("s3://", "lxd://")
"""Sources read here; every other one goes to the original script."""


def request_scheme(argv: list[str]) -> str | None:
    """``s3://`` or ``lxd://`` when this command line's FROM is ours, else None.

    Anything else, a command line getopt rejects included, goes to the original script
    untouched (it prints its own error), unless one of its words names one of our sources
    (then our own one-line usage error is clearer than the stock script's).
    """
    try:
        _, args = getopt.gnu_getopt(argv, _SHORT_OPTS, _LONG_OPTS)
    except getopt.GetoptError:
        args = argv
        words = [a for a in argv if a.startswith(OUR_SCHEMES)]
        return next(s for s in OUR_SCHEMES if words[0].startswith(s)) if words else None
    if not args:
        return None
    return next((s for s in OUR_SCHEMES if args[0].startswith(s)), None)


# --------------------------------------------------------------------------------------------
# Handing a source over to the original script


def find_stock_downloader(environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """The original downloader.sh: the env override (install.sh's wrapper sets it to the
    ``.orig`` beside itself, so a wrapper run by hand without ONE_LOCATION finds it), else the
    installation's ``.orig``.

    A script carrying install.sh's marker is our own wrapper and is never returned (running it
    would loop back here).
    """
    from .installation import Installation

    override = environ.get(STOCK_ENV, "").strip()
    found = Installation.detect(dict(environ)).stock_downloader()
    candidates = [Path(override)] if override else [found] if found is not None else []
    for path in candidates:
        try:
            with open(path, "rb") as fh:
                head = fh.read(WRAPPER_PROBE_BYTES)
        except OSError:
            continue
        if WRAPPER_MARKER in head or not os.access(path, os.X_OK):
            continue
        return path
    return None


def original_environ() -> dict[bytes, bytes] | None:
    """The environment exactly as this process received it, from ``/proc/self/environ``.

    The interpreter may have added variables at start-up (PEP 538 sets ``LC_CTYPE=C.UTF-8``
    under the C locale), which must not reach the original script. None when unavailable.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[name] = value
    return env


def exec_stock(argv: list[str]) -> int:
    """Replace this process with the original script run on ``argv`` (the arguments after it).

    The interpreter ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: they are set
    back to their defaults, because the stock script's partial reads (``-c``) rely on SIGPIPE.
    """
    stock = find_stock_downloader(os.environ)
    if stock is None:
        report_failure(
            "the stock datastore downloader (downloader.sh.orig) is not installed, so this "
            f"source cannot be downloaded; set {STOCK_ENV} or reinstall OpenNebula's datastore "
            "remotes"
        )
        return EXIT_FAILURE
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    env = original_environ()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if env is None:
            os.execv(stock, [str(stock), *argv])
        else:
            os.execve(stock, [os.fsencode(stock), *map(os.fsencode, argv)], env)
    except OSError as exc:
        report_failure(f"cannot run the stock downloader {stock}: {exc.strerror or exc}")
    return EXIT_FAILURE


# --------------------------------------------------------------------------------------------
# s3://


def s3_location(source: str) -> S3Location:
    """``s3://BUCKET/KEY`` (:class:`location.S3Location`), refused as a usage error."""
    try:
        return S3Location.parse(source)
    except UnsafePathError as exc:
        raise UsageError(str(exc)) from None


def market_from_drv_action(environ: dict[str, str] | os._Environ[str]) -> Any:
    """The MARKETPLACE of the datastore action document in ``DRV_ACTION``, as a Market."""
    from .action import Market, decode_base64, parse_xml

    payload = environ.get(DRV_ACTION_ENV, "").strip()
    if not payload:
        raise ConfigError(
            f"{DRV_ACTION_ENV} is not set: an s3:// source needs the datastore action data "
            "with the MARKETPLACE (run by the datastore's cp action)"
        )
    root = parse_xml(decode_base64(payload), DRV_ACTION_ENV)
    market_el = root.find("MARKETPLACE")
    if market_el is None:
        raise PayloadError(
            f"{DRV_ACTION_ENV} <{root.tag}> has no MARKETPLACE: the s3:// source is not an app "
            "exported from an S3 marketplace"
        )
    return Market.from_element(market_el)


def _meta(metadata: dict[str, str], name: str) -> str:
    for k, v in metadata.items():
        if k.lower() == name:
            return v
    return ""


def checks(what: str, opts: Options, meta_md5: str = "", meta_sha256: str = "") -> Verifier:
    """The ``-m``/``-s`` checksums of the command line, then those of the object's metadata."""
    expected = [(name, value, f"--{name}") for name, value in opts.hashes]
    if meta_md5:
        expected.append(("md5", meta_md5, "object metadata md5"))
    if meta_sha256:
        expected.append(("sha256", meta_sha256, "object metadata sha256"))
    return Verifier(what, expected)


def copy_to_dest(source: Source, sink: Sink, opts: Options, verifier: Verifier) -> PumpResult:
    """:func:`stages.pump` with the options' stages, then the sink committed (an archive
    unpacked unless ``-n`` or ``-c``), or aborted on any failure."""
    try:
        result = pump(
            source,
            sink,
            verifier,
            decompress=not opts.nodecomp,
            max_bytes=opts.max_size,
            limit_bps=opts.limit_bps,
        )
        sink.commit(unpack=not opts.nodecomp and not result.partial)  # type: ignore[call-arg]
    except BaseException:
        sink.abort()
        raise
    return result


def open_sink(opts: Options, what: str) -> Sink:
    return StdoutSink() if opts.to_stdout else FileSink(opts.dest, what, owner_tag())


def download_s3(opts: Options, environ: dict[str, str] | os._Environ[str]) -> PumpResult:
    """Download ``opts.source`` from the market in DRV_ACTION to ``opts.dest``."""
    from botocore import exceptions as bexc

    from . import s3config

    loc = s3_location(opts.source)
    what = f"download of {loc.url}"
    market = market_from_drv_action(environ)
    settings = s3config.S3Settings.from_market(market, need_bucket=False)
    overrides: dict[str, float | int] = {"max_pool_connections": 2}
    if opts.noretry:
        overrides["max_attempts"] = 1
    client = s3config.make_client(settings, **overrides)
    ranges = S3Range(client, loc.bucket, loc.key, what, settings.where)
    first = ranges.first()
    metadata = first.get("Metadata") or {}
    verifier = checks(
        what,
        opts,
        _meta(metadata, s3config.METADATA_MD5),
        _meta(metadata, s3config.METADATA_SHA256),
    )
    reader = ResumingReader(
        ranges,
        int(first["ContentLength"]),
        what,
        attempts=0 if opts.noretry else RESUME_ATTEMPTS,
        resumable=s3_stream_errors(),
        body=first["Body"],
    )
    try:
        sink = open_sink(opts, what)
        try:
            return copy_to_dest(reader, sink, opts, verifier)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise s3config.s3_error(exc, what, settings.where) from None
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------
# lxd:// (Linux Containers apps): verified rootfs -> contextualized disk, built without root

LXD_WORKDIR_PREFIX = ".onemarket-lxd."
"""Work folder of one lxd:// download (rootfs, staging tree, image), beside the destination."""
DEFAULT_LXD_TMP = "/var/tmp"
"""Where the work folder goes when the image is written to standard output (as stock)."""


def _drv_action_market_attrs(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The MARKETPLACE attributes of DRV_ACTION when there are some (an lxd:// export works
    without them: the rootfs URL says where the catalog is)."""
    if not environ.get(DRV_ACTION_ENV, "").strip():
        return {}
    try:
        return dict(market_from_drv_action(environ).attrs)
    except MarketError as exc:
        driverlog.debug(f"lxd:// download without marketplace attributes: {exc}")
        return {}


def lxd_workdir(dest: str, environ: dict[str, str] | os._Environ[str]) -> Path:
    """A fresh work folder, on the destination's file system when the destination is a file
    (so the image is renamed into place, sparse, without a copy)."""
    if dest != "-" and not Path(dest).is_dir():
        parent = Path(dest).parent
    else:
        parent = Path(environ.get("TMPDIR") or DEFAULT_LXD_TMP)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{LXD_WORKDIR_PREFIX}{owner_tag()}.", dir=parent))
    except OSError as exc:
        raise from_os_error(exc, f"work folder in {parent}") from None


def install_with_package_manager(
    helper: Path, built: Any, overlay: Any, workdir: Path, what: str
) -> None:
    """What the stock script does with its sudo rule: the package manager, in a chroot of the
    image, installs the context package with its dependencies and scripts."""
    from . import containerdisk, contextroot

    script = contextroot.commands(overlay.install_kind, overlay.package_in_image)
    terminal = "/bin/ash" if overlay.install_kind == "apk" else "/bin/sh"
    problem = contextroot.run_helper(helper, built.raw, workdir, script, terminal, what)
    containerdisk.set_root_owner(built.raw, built.root_uid, built.root_gid, what)
    if problem is None:
        driverlog.info(
            f"{what}: context package {overlay.package} installed by the package manager"
        )
        return
    driverlog.warn(
        f"{what}: installing context package {overlay.package} with the package manager through "
        f"sudo {helper} failed ({problem}): the image keeps its files unpacked without root, "
        f"without the dependencies {', '.join(overlay.skipped_depends) or 'it names'}"
    )


def deliver(image: Path, opts: Options, what: str) -> None:
    """The built image to the destination: renamed into place (fsynced, as every file we
    publish), or streamed (stdout, ``-c``, ``-m``/``-s`` checks, a device or FIFO destination)."""
    direct = (
        not opts.to_stdout
        and not opts.hashes
        and opts.max_size is None
        and not (Path(opts.dest).exists() and not Path(opts.dest).is_file())
    )
    if direct:
        AtomicFile(Path(opts.dest), temp=image, mode=0o666 & ~umask(), written=True).commit()
        return
    with open(image, "rb") as fh:
        copy_to_dest(
            FileSource(fh, str(image)),
            open_sink(opts, what),
            replace(opts, nodecomp=True),
            checks(what, opts),
        )


def catalog_user_agent(attrs: dict[str, str], installation: Any) -> str:
    """The marketplace monitor's User-Agent, so the catalog answer it cached is reused (the
    cache is keyed by URL and agent)."""
    from .action import Market
    from .backends.base import Context
    from .catalogs.linuxcontainers import DRIVER, LinuxContainersCatalog

    market = Market(id=-1, name="lxd:// export", driver=DRIVER, attrs=dict(attrs))
    return LinuxContainersCatalog(market, Context(installation)).user_agent()


def download_lxd(opts: Options, environ: dict[str, str] | os._Environ[str]) -> None:
    """``lxd://<ENDPOINT><path>?size=&filesystem=&format=``: the rootfs found in its server's
    catalog, downloaded and checked (size, sha256), the OpenNebula context package added, the
    disk built without root and written to the destination."""
    from . import containerdisk, contextpkg, contextroot, lxdsource
    from .installation import Installation
    from .progress import Progress, log_progress
    from .web import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, CachedFetcher, fetch_json, make_session

    src = lxdsource.LxdSource.parse(opts.source)
    spec = containerdisk.DiskSpec(src.size_mb, src.filesystem, src.format)
    spec.check()
    if not opts.to_stdout and Path(opts.dest).is_dir():
        raise StorageError(f"destination {opts.dest} is a directory")
    attrs = _drv_action_market_attrs(environ)
    installation = Installation.detect(dict(environ))
    session = make_session(catalog_user_agent(attrs, installation))
    if opts.noretry:
        for adapter in session.adapters.values():
            adapter.max_retries.total = 0  # type: ignore[attr-defined]
    timeouts = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    try:
        # the same catalog as the monitor's, read within the monitor's bounds
        from .catalogs.linuxcontainers import MAX_CATALOG_BYTES, MAX_JSON_VALUES

        fetcher = CachedFetcher(session, installation.cache_dir, max_body_bytes=MAX_CATALOG_BYTES)
        rootfs = lxdsource.locate(
            src,
            lambda url: fetch_json(fetcher, url, max_values=MAX_JSON_VALUES)[0],
            lxdsource.market_endpoint(attrs),
        )
        what = f"container {rootfs.distro} {rootfs.release} {rootfs.variant} ({rootfs.serial})"
        workdir = lxd_workdir(opts.dest, environ)
        try:
            tarball = workdir / f"rootfs.{lxdsource.rootfs_suffix(rootfs.path)}"
            driverlog.info(f"{what}: downloading {rootfs.url} ({rootfs.size} bytes)")
            first = HttpSource(rootfs.url, session, size=rootfs.size, timeouts=timeouts)
            reader = ResumingReader(
                first.open_at,
                rootfs.size,
                f"download of {rootfs.url}",
                attempts=0 if opts.noretry else RESUME_ATTEMPTS,
                body=first.body,
            )
            progress = Progress(rootfs.size, log_progress(f"{what}: download"))
            try:
                with open(tarball, "wb") as fh:
                    lxdsource.save_verified(reader, rootfs, fh, progress)
            except OSError as exc:
                raise from_os_error(exc, f"{what}: saving the rootfs in {workdir}") from None
            finally:
                reader.close()
            progress.finish()
            helper = contextroot.usable_helper(environ)
            overlay = contextpkg.build_overlay(
                rootfs.distro,
                rootfs.release,
                attrs,
                environ,
                session,
                workdir,
                timeouts,
                include_package_file=helper is not None,
            )
            layers = [(tarball, f"rootfs {rootfs.url}")]
            if overlay.tar is not None:
                layers.append((overlay.tar, f"context package {overlay.package}"))
            built = containerdisk.build(layers, spec, workdir, what)
            tarball.unlink()
            if overlay.package_in_image and helper is not None:
                install_with_package_manager(helper, built, overlay, workdir, what)
            elif overlay.skipped_depends:
                driverlog.warn(
                    f"{what}: context package {overlay.package} unpacked without the "
                    "distribution's package manager (that needs root, and sudo -n for "
                    f"{contextroot.helper_path(environ)} is not granted): its dependencies "
                    f"{', '.join(overlay.skipped_depends)} and its install scripts were "
                    "skipped, the container has only those its rootfs ships"
                )
            image = containerdisk.finish(built.raw, spec, what)
            deliver(image, opts, what)
            driverlog.info(f"{what}: {spec.format} disk of {spec.size_mb} MB written")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        session.close()


# --------------------------------------------------------------------------------------------
# Failure line and leftovers


def report_failure(message: str) -> None:
    """The failure as oned's datastore driver needs it to reach the image's error message.

    ``ERROR: <message>`` for oned.log, then, under OpenNebula 7.x, the message again without a
    prefix: the datastore ``cp`` script folds the first line of the downloader's stderr into its
    own ``ERROR: ... Command ... failed:`` log line (multiline_exec_and_log, one-7.0:
    src/mad/sh/scripts_common.sh:275-296), and 7.x's driver keeps out of the error message every
    line starting with ``ERROR:``/``INFO:``/``WARN:``/``DEBUG:``, joining the others
    (get_info_from_execution, one-7.0: src/mad/ruby/DriverExecHelper.rb:167-210), so only an
    unprefixed line after the first reaches ``oneimage show``. 6.10 puts all of stderr in the
    message (one-6.10: src/mad/ruby/CommandManager.rb:97-101), where the ERROR line suffices.
    The plain line ends with ``;``: the driver joins lines without a space, and its next one is
    the cp script's "Error copying ...". The same holds for every datastore whose ``cp`` runs the
    downloader through multiline_exec_and_log (fs/cp:159,179, ceph/cp:150 on one-7.0). The old
    ``ERROR MESSAGE --8<------`` block is parsed by neither release (only a stale spec,
    src/mad/ruby/test/OpenNebulaDriver_spec.rb:262, still mentions it).
    """
    from .installation import Installation

    driverlog.error(message)
    if Installation.detect(dict(os.environ)).release_line().is_7x:
        line = driverlog.scrub(one_line(message))
        out = driverlog.stream if driverlog.stream is not None else sys.stderr
        out.write(f"{line};\n")
        out.flush()


def remove_stale_leftovers(dest: str, environ: Any = None) -> list[Path]:
    """Remove what a SIGKILLed run of this host left (its ``.part`` file or lxd work folder),
    beside the destination and in the lxd temporary folder; the owner's pid must be gone."""
    env = os.environ if environ is None else environ
    folders = [Path(env.get("TMPDIR") or DEFAULT_LXD_TMP)]
    if dest != "-":
        folders.insert(0, Path(dest).parent)
    why = "an earlier download that was killed"
    removed: list[Path] = []
    for folder in folders:
        removed += sweep_temps(folder, LXD_WORKDIR_PREFIX, "", left_by=why)
        removed += sweep_temps(folder, TEMP_PREFIX, left_by=why)
    return removed


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``downloader.sh [options] FROM TO``."""
    args = list(sys.argv[1:] if argv is None else argv)
    scheme = request_scheme(args)
    if scheme is None:
        return exec_stock(args)
    from .transfer.interrupt import interruptible

    driverlog.set_debug(driverlog.debug_from_env())
    driverlog.route_std_logging()
    what = f"{scheme} download"
    try:
        with interruptible(what):
            opts = parse_args(args)
            remove_stale_leftovers(opts.dest)
            if scheme == "lxd://":
                download_lxd(opts, os.environ)
            else:
                download_s3(opts, os.environ)
    except MarketError as exc:
        report_failure(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        report_failure(f"{what} interrupted")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        report_failure(f"{what} failed ({type(exc).__name__})")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
