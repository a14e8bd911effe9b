"""The MAD's life as oned runs it: start (one-word ARGUMENTS, fd 2 closed, INIT), start-up
failures, EOF and oned's stop with work queued, and a restart after the MAD was SIGKILLed.

Every MAD here is started by tests/servers/oned.py, which reproduces include/Driver.h.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.backends.test_s3 import market_attrs, new_bucket, raw_client
from tests.payloads import app_xml, datastore_xml, export_output, import_payload, monitor_payload
from tests.servers.httpd import StaticHttpServer
from tests.servers.oned import DriverInitError, OneLocation
from tests.servers.rgw import CephRgw
from tests.test_mad import children_of, gate_script, pid_gone, stalled, wait_for
from tests.waiting import until

FAKEDS = datastore_xml(ds_mad="fakeds")
MIB = 1024 * 1024
EXIT_BOUND_S = 10.0
"""oned SIGKILLs a MAD that has not exited 10 s after FINALIZE (stop_driver(10))."""


def uploads_open(s3, bucket: str) -> list[dict]:
    """The bucket's multipart uploads ([] until an import has made the bucket)."""
    try:
        return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    except s3.exceptions.NoSuchBucket:
        return []


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


def mad_family(pid: int) -> list[int]:
    """The MAD's children and grandchildren (forked actions and what they run)."""
    seen, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            seen.append(child)
            todo.append(child)
    return seen


def wait_gone(pids: list[int], timeout_s: float = EXIT_BOUND_S) -> None:
    until(lambda: all(pid_gone(p) for p in pids), f"the end of {pids}", timeout_s)


# ------------------------------------------------------------------------------------------
# start


def test_one_word_arguments_are_split_and_enforced(oned: OneLocation, tmp_path: Path) -> None:
    # ARGUMENTS = "-t 4 -w 1" reaches the MAD as ONE argv word (Driver.h execlp); a hung action
    # times out after 1 s, so -w was read from it
    oned.add_driver("tiny", {"monitor": "#!/bin/sh\nsleep 60\n"})
    mad = oned.start("-t 4 -w 1")
    assert mad.argument == "-t 4 -w 1"
    assert mad.init_answer == b"INIT SUCCESS\n"  # within the 31 bytes of oned's one read
    mad.request("MONITOR", 3, monitor_payload("tiny"))
    reply = mad.reply()
    assert not reply.ok and reply.info == "tiny monitor timed out after 1 s"
    assert "4 at once, timeout 1.0" in mad.log_text()


def test_oneds_blocked_signals_are_unblocked(oned: OneLocation) -> None:
    # oned starts the MAD with every signal blocked (Nebula.cc); a MAD that kept the mask could
    # not SIGTERM its own forked actions (-w, FINALIZE, parent death would skip clean-ups)
    mad = oned.start()
    status = Path(f"/proc/{mad.pid}/status").read_text()
    blocked = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk"))
    assert int(blocked, 16) == 0


def test_empty_arguments_and_several_words(oned: OneLocation) -> None:
    mad = oned.start()  # ARGUMENTS = "": one empty word
    assert mad.argument == ""
    assert "15 at once" in mad.log_text()
    mad.finalize()
    # several words, as a terminal or the one-market CLI passes them
    proc = subprocess.run(
        [str(oned.mad), "-t", "3", "-m", "http"],
        input=b"INIT\n",
        capture_output=True,
        env={**os.environ, "ONE_LOCATION": str(oned.root)},
        timeout=30,
        check=False,
    )
    assert proc.stdout == b"INIT SUCCESS\n" and proc.returncode == 0


def test_fd2_closed_without_debug_still_serves(oned: OneLocation, tmp_path: Path) -> None:
    # without ONE_MAD_DEBUG the MAD's stderr goes nowhere, and oned closed fd 2: actions that
    # write to stderr must still run and their log lines still reach oned
    script = '#!/bin/sh\necho "INFO: hello" >&2\necho noise >&2\necho "USED_MB=1"\n'
    oned.add_driver("tiny", {"monitor": script})
    mad = oned.start("-m tiny", env={"ONE_MAD_DEBUG": ""})
    mad.request("MONITOR", 5, monitor_payload("tiny"))
    reply = mad.reply()
    assert reply.ok and reply.decoded() == b"USED_MB=1\n"
    assert [(x.severity, x.message) for x in mad.logs] == [("I", "hello")]
    assert mad.log_text() == ""  # nothing logged without ONE_MAD_DEBUG when all is well


def test_missing_interpreter_answers_init_failure(oned: OneLocation) -> None:
    wrapper = oned.mad.read_text()
    oned.mad.write_text(wrapper.replace(f'PY="{sys.executable}"', 'PY="/nonexistent/python3"'))
    with pytest.raises(DriverInitError, match="INIT FAILURE"):
        oned.start(env={"ONE_MAD_DEBUG": ""})
    log = (oned.root / "var" / "one_market.log").read_text()
    assert "cannot start: the driver's Python interpreter /nonexistent/python3 is missing" in log


def test_missing_library_answers_init_failure(oned: OneLocation) -> None:
    wrapper = oned.mad.read_text()
    assert 'PKG="/' in wrapper  # install.sh wrote the library's folder
    start = wrapper.index('PKG="') + len('PKG="')
    end = wrapper.index('"', start)
    oned.mad.write_text(wrapper[:start] + "/nonexistent/onemarket" + wrapper[end:])
    with pytest.raises(DriverInitError, match="INIT FAILURE"):
        oned.start(env={"ONE_MAD_DEBUG": ""})
    assert "the onemarket library is missing" in (oned.root / "var/one_market.log").read_text()


def test_unimportable_dependency_answers_init_failure(tmp_path: Path) -> None:
    # lxml missing from the venv: the start-up module, which needs only the standard library,
    # still answers INIT and says why in the log
    log = tmp_path / "one_market.log"
    code = (
        "import sys; sys.modules['lxml'] = None\n"
        "from onemarket.madstart import main\nmain(['-t 2'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        input=b"INIT\n",
        capture_output=True,
        env={**os.environ, "ONE_MARKET_MAD_LOG": str(log)},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith(
        b"INIT FAILURE cannot load the driver library (ModuleNotFoundError"
    )
    assert proc.stdout.count(b"\n") == 1
    assert "cannot start: cannot load the driver library" in log.read_text()


# ------------------------------------------------------------------------------------------
# EOF and oned's stop with work queued: nothing is published after oned stopped reading


def _queued_imports(
    oned: OneLocation, httpd: StaticHttpServer, driver: str, attrs: dict[str, str], sent: int
) -> tuple[threading.Event, object]:
    release = threading.Event()
    httpd.routes["/image"] = stalled(b"x" * sent, 64 * MIB, release)
    info = export_output(f"{httpd.url}/image", size_mb=64)
    oned.add_datastore("fakeds", f'#!/bin/sh\necho "{info}"\n')
    mad = oned.start(f"-t 2 -m {driver}")
    for i in range(6):
        app = app_xml(id=200 + i, name=f"app {i}")
        mad.request("IMPORT", 200 + i, import_payload(driver, attrs, app=app, datastore=FAKEDS))
    return release, mad


@pytest.mark.parametrize("stop", ["eof", "finalize"])
def test_stop_with_queued_http_imports_publishes_nothing(
    oned: OneLocation, tmp_path: Path, httpd: StaticHttpServer, stop: str
) -> None:
    public = tmp_path / "public"
    public.mkdir()
    attrs = {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(public)}
    release, mad = _queued_imports(oned, httpd, "http", attrs, MIB)
    try:
        # two imports write their temporary files
        until(lambda: len(list(public.iterdir())) >= 2, "two imports to start")
        family = mad_family(mad.pid)
        if stop == "eof":
            mad.crash()  # oned died: both pipes closed, no FINALIZE
            assert mad.wait(EXIT_BOUND_S) == 0
        else:
            assert mad.finalize() == 0  # exited by itself inside stop_driver(10)
        wait_gone(family)
    finally:
        release.set()
    assert files_in(public) == []
    assert "queued ones not started" in mad.log_text()


def test_stop_with_queued_s3_imports_leaves_no_object_or_upload(
    oned: OneLocation, rgw: CephRgw, httpd: StaticHttpServer
) -> None:
    bucket = new_bucket()
    s3 = raw_client(rgw)
    attrs = market_attrs(rgw, bucket, READ_LENGTH="8")
    release, mad = _queued_imports(oned, httpd, "s3", attrs, 20 * MIB)
    try:
        # both running imports have a multipart upload open
        until(lambda: len(uploads_open(s3, bucket)) >= 2, "two uploads to start", 30)
        family = mad_family(mad.pid)
        mad.crash()
        assert mad.wait(EXIT_BOUND_S) == 0
        wait_gone(family)
    finally:
        release.set()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_hung_export_after_eof_is_ended_in_bounded_time(oned: OneLocation, tmp_path: Path) -> None:
    # no -w, and an export that ignores SIGTERM: EOF still ends the MAD and the export
    script = f"#!/bin/sh\ntrap '' TERM\nsleep 300 &\necho $! > {tmp_path}/child\nwait\n"
    oned.add_datastore("fakeds", script)
    mad = oned.start("-m http")
    attrs = {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(tmp_path)}
    mad.request("IMPORT", 9, import_payload("http", attrs, app=app_xml(id=9), datastore=FAKEDS))
    wait_for(tmp_path / "child")
    child = int((tmp_path / "child").read_text())
    mad.crash()
    assert mad.wait(EXIT_BOUND_S) == 0
    wait_gone([child])


def test_requests_after_finalize_are_not_started(oned: OneLocation, tmp_path: Path) -> None:
    oned.add_driver("tiny", {"monitor": gate_script(tmp_path)})
    mad = oned.start("-t 1 -m tiny", restart=False)
    payload = monitor_payload("tiny")
    mad.send(f"MONITOR  1 {payload}", f"MONITOR  2 {payload}")
    wait_for(tmp_path / "started.1")
    mad.send("FINALIZE", f"MONITOR  3 {payload}")  # oned still has its pipes open here
    assert mad.wait(EXIT_BOUND_S) == 0
    replies = [line for line in mad.rest() if not line.startswith("LOG ")]
    assert sorted(line.split()[2] for line in replies) == ["1", "2"]
    assert all(" FAILURE " in line and "stopped" in line for line in replies)
    assert not (tmp_path / "started.2").exists() and not (tmp_path / "started.3").exists()


# ------------------------------------------------------------------------------------------
# restart


@pytest.mark.parametrize("children", ["mad_only", "with_children"])
def test_restart_after_sigkill_serves_again(
    oned: OneLocation, tmp_path: Path, httpd: StaticHttpServer, children: str
) -> None:
    public = tmp_path / "public"
    public.mkdir()
    attrs = {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(public)}
    release = threading.Event()
    httpd.routes["/slow"] = stalled(b"x" * MIB, 8 * MIB, release)
    httpd.routes["/image"] = b"y" * (2 * MIB)
    info = tmp_path / "info"
    info.write_text(export_output(f"{httpd.url}/slow", size_mb=8))
    oned.add_datastore("fakeds", f'#!/bin/sh\nread p\ncat "{info}"\n')
    mad = oned.start("-m http")
    try:
        mad.request("IMPORT", 1, import_payload("http", attrs, app=app_xml(id=1), datastore=FAKEDS))
        until(lambda: list(public.iterdir()), "the import to start")
        family = mad_family(mad.pid)
        old = mad.pid
        if children == "with_children":
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        os.kill(old, signal.SIGKILL)
        # oned saw EOF: stop_driver(1), start_driver, INIT
        until(lambda: mad.restarts >= 1, "oned to restart the MAD")
        assert mad.pid not in (-1, old)
        wait_gone(family)  # a forked action dies with the MAD (and cleans up on its SIGTERM)
    finally:
        release.set()
    if children == "mad_only":
        assert files_in(public) == []  # the orphaned import removed its temporary file
    else:  # SIGKILLed too: only a temporary file is left, never an app file
        assert all(p.name.startswith(".app-") and p.suffix == ".part" for p in files_in(public))
    mad.request("MONITOR", 2, monitor_payload("http", attrs))
    assert mad.reply().ok
    info.write_text(export_output(f"{httpd.url}/image", size_mb=2))
    mad.request("IMPORT", 3, import_payload("http", attrs, app=app_xml(id=3), datastore=FAKEDS))
    reply = mad.reply()
    assert reply.ok, reply
    assert b"SOURCE" in reply.decoded()
