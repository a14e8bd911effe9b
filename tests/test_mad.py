"""The one_market MAD, spawned for real from a ``install.sh -d`` layout, driven like oned."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from onemarket.installation import Installation
from onemarket.mad import children, driver, failures, options
from onemarket.mad.lines import LineSplitter

from tests.payloads import (
    action_payload,
    app_xml,
    datastore_xml,
    delete_payload,
    export_output,
    import_payload,
    market_xml,
    monitor_payload,
)
from tests.servers.httpd import Handler, StaticHttpServer
from tests.servers.oned import DriverInitError, OneLocation, parse_reply
from tests.waiting import WAIT_S, until

MONITOR_OK = '#!/bin/sh\necho "USED_MB=1"\necho "FREE_MB=2"\necho "TOTAL_MB=3"\n'
FAKEDS = datastore_xml(ds_mad="fakeds")
"""The DATASTORE of IMPORT requests whose export is a test's ``fakeds`` script."""


def wait_for(path: Path) -> None:
    until(path.exists, f"{path} to appear")


def gate_script(tmp: Path, before: str = "", after: str = "") -> str:
    """A script that runs ``before``, says it started, waits for a 'go' file, runs ``after``."""
    return (
        "#!/bin/sh\n"
        f"{before}\n"
        f'touch "{tmp}/started.$2"\n'
        f"i=0; while [ ! -e '{tmp}/go' ] && [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done\n"
        f"{after}\n"
    )


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------------------------------
# protocol basics


def test_init_and_finalize_exit_zero(oned: OneLocation) -> None:
    mad = oned.start("-t", "4")
    mad.send("INIT")
    assert mad.next_line() == "INIT SUCCESS\n"
    assert mad.finalize() == 0
    assert mad.rest() == []


def test_eof_exits_zero(oned: OneLocation) -> None:
    mad = oned.start(restart=False)
    mad.send("INIT")
    assert mad.next_line() == "INIT SUCCESS\n"
    mad.close_stdin()
    assert mad.wait(timeout_s=5) == 0


def test_invalid_base64_and_xml_get_one_line_failures(oned: OneLocation) -> None:
    mad = oned.start("-t", "4")
    not_xml = base64.b64encode(b"<MARKET_DRIVER_ACTION_DATA><oops").decode()
    wrong_root = base64.b64encode(b"<OTHER/>").decode()
    mad.request("MONITOR", 11, "!!not*base64!!")
    mad.request("MONITOR", 12, not_xml)
    mad.request("DELETE", 13, wrong_root)
    mad.request("IMPORT", 14, "")
    replies = {r.id: r for r in mad.replies(4)}
    assert replies[11].action == "MONITOR" and replies[11].result == "FAILURE"
    assert "base64" in replies[11].info
    assert "XML" in replies[12].info
    assert replies[13].action == "DELETE" and not replies[13].ok
    assert replies[14].action == "IMPORT" and not replies[14].ok
    assert mad.finalize() == 0
    assert mad.rest() == []


def test_malformed_lines_are_skipped_and_logged(oned: OneLocation) -> None:
    mad = oned.start()
    secret_b64 = base64.b64encode(b"<x>SECRET_ACCESS_KEY</x>" * 4).decode()
    mad.send("", "   ", "BOGUS 1 abc", "MONITOR abc", "MONITOR", secret_b64, "\r")
    mad.send_raw(b"\x00\xff\xfe\x80 1 2\n" + b"\xc3" * 100_000 + b"\nMONITOR \x00 x\n")
    mad.send("INIT")
    assert mad.next_line() == "INIT SUCCESS\n"
    assert mad.finalize() == 0
    assert mad.rest() == []
    log = mad.log_text()
    assert "ignored a line" in log and "BOGUS" in log
    assert secret_b64 not in log and secret_b64[:20] not in log


def test_an_id_past_the_int_conversion_limit_is_a_malformed_line(oned: OneLocation) -> None:
    """5,000 digits once raised int()'s ValueError in the reader: the lines after it were lost."""
    mad = oned.start("-m", "http")
    huge = b"1" * 5000
    bad = b"MONITOR  " + huge + b" x\nDRIVER_CANCEL " + huge + b"\n"
    mad.send_raw(bad + b"MONITOR  7 eA==\nMONITOR  8 eA==\n")
    replies = {r.id: r for r in mad.replies(2)}
    assert sorted(replies) == [7, 8] and not replies[7].ok and "XML" in replies[8].info
    assert mad.finalize() == 0
    assert mad.rest() == []
    log = mad.log_text()
    assert log.count("ignored a line from oned") == 2 and "5000 chars" in log
    assert "Traceback" not in log and "Exception" not in log


def test_unknown_option_answers_init_failure_and_logs_why(oned: OneLocation) -> None:
    with pytest.raises(DriverInitError, match="INIT FAILURE wrong ARGUMENTS"):
        oned.start("--bogus")
    assert (
        "cannot start: wrong ARGUMENTS in oned.conf"
        in (oned.root / "var/one_market.log").read_text()
    )


def test_driver_not_enabled_gets_exactly_one_failure(oned: OneLocation) -> None:
    marker = oned.root / "ran"
    oned.add_driver("tiny", {"monitor": f"#!/bin/sh\ntouch {marker}\n"})
    mad = oned.start("-m", "http")
    mad.request("MONITOR", 5, monitor_payload("tiny"))
    mad.request("MONITOR", 6, monitor_payload("../../../bin"))
    first, second = mad.replies(2)
    assert first == parse_reply("MONITOR FAILURE 5 Marketplace driver 'tiny' not available\n")
    assert second.id == 6 and not second.ok and "not available" in second.info
    assert mad.finalize() == 0
    assert mad.rest() == []
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# custom driver folders: executed as upstream does


def test_200_monitors_at_once_get_200_replies(oned: OneLocation) -> None:
    oned.add_driver("tiny", {"monitor": MONITOR_OK})
    mad = oned.start("-t", "4")
    payload = monitor_payload("tiny")
    mad.send("INIT", *(f"MONITOR  {i} {payload}" for i in range(200)))
    assert mad.next_line() == "INIT SUCCESS\n"
    replies = mad.replies(200)
    assert sorted(r.id for r in replies) == list(range(200))
    for r in replies:
        assert r.action == "MONITOR" and r.ok, r
        assert r.decoded() == b"USED_MB=1\nFREE_MB=2\nTOTAL_MB=3\n"
    assert mad.finalize() == 0
    assert mad.rest() == []


def test_custom_script_gets_upstream_arguments(oned: OneLocation) -> None:
    args = oned.root / "args"
    oned.add_driver(
        "tiny",
        {
            "delete": f'#!/bin/sh\nprintf "%s\\n" "$#" "$1" "$2" > {args}\n',
            "monitor": "#!/bin/sh\necho first problem >&2\necho second >&2\nexit 3\n",
        },
    )
    mad = oned.start()
    payload = delete_payload("tiny", app=app_xml(id=9))
    mad.request("DELETE", 9, payload)
    assert mad.reply() == parse_reply("DELETE SUCCESS 9 -\n")
    assert args.read_text().split("\n")[:3] == ["2", payload, "9"]
    mad.request("MONITOR", 4, monitor_payload("tiny"))
    assert mad.reply() == parse_reply("MONITOR FAILURE 4 first problem; second\n")


def test_script_without_shebang_runs_through_a_shell(oned: OneLocation) -> None:
    oned.add_driver("tiny", {"monitor": "echo USED_MB=5\n"})
    mad = oned.start()
    mad.request("MONITOR", 1, monitor_payload("tiny"))
    assert mad.reply().decoded() == b"USED_MB=5\n"


def test_silent_failure_names_driver_and_exit_code(oned: OneLocation) -> None:
    oned.add_driver("tiny", {"monitor": "#!/bin/sh\nexit 7\n"})
    mad = oned.start()
    mad.request("MONITOR", 1, monitor_payload("tiny"))
    reply = mad.reply()
    assert not reply.ok and "tiny monitor" in reply.info and "7" in reply.info


def test_missing_action_script(oned: OneLocation) -> None:
    oned.add_driver("tiny", {"monitor": MONITOR_OK})
    mad = oned.start()
    mad.request("DELETE", 2, delete_payload("tiny"))
    reply = mad.reply()
    assert not reply.ok and "has no delete action" in reply.info


def test_without_one_location_the_system_layout_is_used(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONE_LOCATION"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onemarket.madstart", "-m nosuchdriver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"INIT\nMONITOR  1 {monitor_payload('nosuchdriver')}\n".encode())
    proc.stdin.flush()
    lines = [proc.stdout.readline().decode() for _ in range(2)]
    proc.stdin.close()
    assert proc.wait(timeout=WAIT_S) == 0
    assert proc.stdout.read() == b""
    proc.stdout.close()
    assert lines[0] == "INIT SUCCESS\n"
    assert lines[1].startswith("MONITOR FAILURE 1 Marketplace driver 'nosuchdriver' has no")
    assert "/var/lib/one/remotes/market/nosuchdriver/monitor" in lines[1]


def test_delete_of_template_apps_runs_nothing(oned: OneLocation) -> None:
    marker = oned.root / "ran"
    oned.add_driver("tiny", {"delete": f"#!/bin/sh\ntouch {marker}\n"})
    mad = oned.start()
    for app_type in (2, 3):
        mad.request("DELETE", app_type, delete_payload("tiny", app=app_xml(type=app_type)))
        assert mad.reply() == parse_reply(f"DELETE SUCCESS {app_type} -\n")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# stderr: LOG lines and failure text


def test_log_lines_are_forwarded_while_the_action_runs(oned: OneLocation, tmp_path: Path) -> None:
    script = gate_script(tmp_path, before='echo "INFO: downloading 10%" >&2', after="echo OK=1")
    oned.add_driver("tiny", {"monitor": script})
    mad = oned.start()
    mad.request("MONITOR", 21, monitor_payload("tiny"))
    assert mad.next_line() == "LOG I 21 downloading 10%\n"
    assert not (tmp_path / "go").exists()  # the action is still waiting: the LOG came live
    (tmp_path / "go").touch()
    reply = mad.reply()
    assert reply.ok and reply.decoded() == b"OK=1\n"


def test_error_lines_logged_once_and_failure_joined(oned: OneLocation) -> None:
    script = (
        "#!/bin/sh\n"
        'echo "ERROR: disk on fire" >&2\n'
        'echo "WARN: 12: smoke" >&2\n'
        'echo "DEBUG: details" >&2\n'
        'echo "cannot write" >&2\n'
        'echo "  " >&2\n'
        'printf "no space left" >&2\n'
        "exit 1\n"
    )
    oned.add_driver("tiny", {"monitor": script})
    mad = oned.start()
    mad.request("MONITOR", 3, monitor_payload("tiny"))
    reply = mad.reply()
    assert reply.info == "cannot write; no space left"
    assert mad.finalize() == 0
    mad.rest()
    log_lines = [line for line in mad.lines if line.startswith("LOG")]
    assert log_lines == ["LOG E 3 disk on fire\n", "LOG W 3 smoke\n", "LOG D 3 details\n"]


def test_payload_never_reaches_logs_or_failures(oned: OneLocation) -> None:
    secret = "Zm9vYmFyc2VjcmV0a2V5MTIzNDU2Nzg5MA"
    loud = (
        '#!/bin/sh\necho "INFO: got $1" >&2\necho "ERROR: $1" >&2\n'
        'echo "failed on $1 here" >&2\nexit 1\n'
    )
    oned.add_driver("tiny", {"monitor": loud, "import": loud})
    oned.add_datastore("fakeds", '#!/bin/sh\nread p\necho "export of $p failed" >&2\nexit 1\n')
    mad = oned.start()
    payload = monitor_payload("tiny", {"SECRET_ACCESS_KEY": secret})
    mad.request("MONITOR", 1, payload)
    first = mad.reply()
    imp = import_payload("tiny", {"SECRET": secret}, datastore=FAKEDS)
    mad.request("IMPORT", 2, imp)
    second = mad.reply()
    mad.request("MONITOR", 3, "x" * 300 + "!")
    mad.reply()
    assert mad.finalize() == 0
    mad.rest()
    assert "failed on <action data> here" in first.info
    assert "export of <action data> failed" in second.info
    everything = "".join(mad.lines) + mad.log_text()
    for needle in (payload, imp, payload[40:80], imp[40:80], "x" * 300):
        assert needle not in everything


# ------------------------------------------------------------------------------------------
# IMPORT: datastore export, then market import


def test_import_runs_export_then_import(oned: OneLocation, tmp_path: Path) -> None:
    info = export_output("/var/tmp/image.qcow2", md5="0" * 32, size_mb=42, format="qcow2")
    oned.add_datastore(
        "fakeds",
        f'#!/bin/sh\ncat > {tmp_path}/export.stdin\necho "$#:$1" > {tmp_path}/export.args\n'
        f'echo "INFO: exporting" >&2\necho "{info}"\n',
    )
    oned.add_driver(
        "tiny",
        {
            "import": f'#!/bin/sh\necho "$1" > {tmp_path}/import.arg\n'
            'echo SOURCE=\\"http://x/app\\"\necho MD5=\\"abc\\"\necho SIZE=\\"42\\"\n'
            'echo FORMAT=\\"qcow2\\"\n'
        },
    )
    mad = oned.start()
    mad.request("IMPORT", 8, import_payload("tiny", app=app_xml(id=8), datastore=FAKEDS))
    reply = mad.reply()
    assert reply.ok, reply
    assert reply.decoded() == b'SOURCE="http://x/app"\nMD5="abc"\nSIZE="42"\nFORMAT="qcow2"\n'
    assert mad.logs[0].message == "exporting" and mad.logs[0].id == 8
    assert (tmp_path / "export.args").read_text() == "1:8\n"
    ds_doc = base64.b64decode((tmp_path / "export.stdin").read_text())
    assert ds_doc.startswith(b"<DS_DRIVER_ACTION_DATA><IMAGE>") and b"<DATASTORE>" in ds_doc
    market_doc = base64.b64decode((tmp_path / "import.arg").read_text()).decode()
    for expected in (
        "<IMPORT_SOURCE>/var/tmp/image.qcow2</IMPORT_SOURCE>",
        f"<MD5>{'0' * 32}</MD5>",
        "<SIZE>42</SIZE>",
        "<FORMAT>qcow2</FORMAT>",
        "<DISPOSE>NO</DISPOSE>",
    ):
        assert expected in market_doc


def test_import_failures(oned: OneLocation) -> None:
    oned.add_driver("tiny", {"import": "#!/bin/sh\nexit 9\n"})
    oned.add_datastore("garbage", "#!/bin/sh\necho not xml\n")
    mad = oned.start()

    def imp(id_: int, payload: str) -> str:
        mad.request("IMPORT", id_, payload)
        reply = mad.reply()
        assert not reply.ok and reply.id == id_
        return reply.info

    def to_ds(ds_mad: str, app: str | None = None) -> str:
        return import_payload("tiny", app=app, datastore=datastore_xml(ds_mad=ds_mad))

    assert "DS_MAD" in imp(1, to_ds(""))
    assert "'nods' not available" in imp(2, to_ds("nods"))
    assert "not available" in imp(3, to_ds("../tiny"))
    assert "XML" in imp(4, to_ds("garbage"))
    assert "only images" in imp(5, to_ds("x", app=app_xml(type=2)))
    no_image = action_payload(
        market=market_xml("tiny"), app=app_xml(), datastore=datastore_xml(ds_mad="garbage")
    )
    assert "IMAGE" in imp(6, no_image)


# ------------------------------------------------------------------------------------------
# timeouts, cancel, concurrency, shutdown


def test_hung_action_and_its_children_are_killed(oned: OneLocation, tmp_path: Path) -> None:
    # the script and its child ignore SIGTERM: only the SIGKILL after the grace period ends them
    script = f"#!/bin/sh\ntrap '' TERM\nsleep 300 &\necho $! > {tmp_path}/child\nwait\n"
    oned.add_driver("tiny", {"monitor": script})
    mad = oned.start("-w", "1")
    mad.request("MONITOR", 31, monitor_payload("tiny"))
    reply = mad.reply()
    assert reply == parse_reply("MONITOR FAILURE 31 tiny monitor timed out after 1 s\n")
    child = int((tmp_path / "child").read_text())
    until(lambda: pid_gone(child), "the end of the hung action's child")


def test_driver_cancel_kills_the_action(oned: OneLocation, tmp_path: Path) -> None:
    oned.add_driver("tiny", {"monitor": gate_script(tmp_path)})
    mad = oned.start()
    mad.request("MONITOR", 41, monitor_payload("tiny"))
    wait_for(tmp_path / "started.41")
    mad.send("DRIVER_CANCEL 41")
    reply = mad.reply()
    assert reply.id == 41 and not reply.ok and "cancel" in reply.info


def test_concurrency_limit_queues_requests(oned: OneLocation, tmp_path: Path) -> None:
    oned.add_driver("tiny", {"monitor": gate_script(tmp_path, after="echo A=1")})
    mad = oned.start("-t", "2")
    payload = monitor_payload("tiny")
    mad.send(*(f"MONITOR  {i} {payload}" for i in range(5)))
    wait_for(tmp_path / "started.0")
    wait_for(tmp_path / "started.1")
    mad.send("INIT")  # a round trip: the MAD has read and queued all five by now
    assert mad.next_line() == "INIT SUCCESS\n"
    assert sorted(p.name for p in tmp_path.glob("started.*")) == ["started.0", "started.1"]
    (tmp_path / "go").touch()
    assert sorted(r.id for r in mad.replies(5)) == list(range(5))


def test_finalize_ends_running_actions(oned: OneLocation, tmp_path: Path) -> None:
    # oned's stop: FINALIZE and both pipes closed at once; nobody reads a reply any more, so
    # the running action is ended rather than waited for, and the MAD exits before oned's kill
    before = f'echo $$ > "{tmp_path}/pid.$2"'
    oned.add_driver("tiny", {"monitor": gate_script(tmp_path, before=before)})
    mad = oned.start()
    mad.request("MONITOR", 51, monitor_payload("tiny"))
    wait_for(tmp_path / "started.51")
    action = int((tmp_path / "pid.51").read_text())
    assert mad.finalize() == 0  # exited on its own within stop_driver(10): not SIGKILLed
    assert pid_gone(action)
    assert "stopping (oned sent FINALIZE)" in mad.log_text()


def test_sigterm_kills_running_actions_and_answers(oned: OneLocation, tmp_path: Path) -> None:
    oned.add_driver("tiny", {"monitor": gate_script(tmp_path)})
    mad = oned.start("-t", "1", restart=False)
    payload = monitor_payload("tiny")
    mad.send(f"MONITOR  61 {payload}", f"MONITOR  62 {payload}")
    wait_for(tmp_path / "started.61")
    os.kill(mad.pid, signal.SIGTERM)
    assert mad.wait() == 0
    replies = [parse_reply(x) for x in mad.rest()]
    assert sorted(r.id for r in replies) == [61, 62]
    assert all(not r.ok and "stopped" in r.info for r in replies)


# ------------------------------------------------------------------------------------------
# our own drivers: forked from the MAD, no interpreter start


def test_http_monitor_runs_in_a_forked_child(oned: OneLocation, tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    mad = oned.start("-t", "4", "-m", "http,one")
    payload = monitor_payload(
        "http", {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(public)}
    )
    mad.send(*(f"MONITOR  {i} {payload}" for i in range(20)))
    replies = mad.replies(20)
    assert sorted(r.id for r in replies) == list(range(20))
    for r in replies:
        assert r.ok, r
        assert b"TOTAL_MB" in r.decoded() and b"APP" not in r.decoded()
    mad.request("MONITOR", 99, monitor_payload("http", {"BASE_URL": "http://127.0.0.1:9/"}))
    failure = mad.reply()
    assert not failure.ok and "PUBLIC_DIR" in failure.info
    assert mad.finalize() == 0
    assert payload not in mad.log_text()


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stalled(sent: bytes, announced: int, release: threading.Event) -> Handler:
    """A route that sends ``sent`` of ``announced`` bytes, then stalls until ``release``."""

    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(announced))
        h.end_headers()
        h.wfile.write(sent)
        h.wfile.flush()
        release.wait(WAIT_S)
        h.close_connection = True

    return handler


def test_forked_import_killed_on_timeout_cleans_up(
    oned: OneLocation, tmp_path: Path, httpd: StaticHttpServer
) -> None:
    release = threading.Event()
    httpd.routes["/image"] = stalled(b"x" * (1024 * 1024), 8 * 1024 * 1024, release)
    source = f"{httpd.url}/image"
    oned.add_datastore("fakeds", f'#!/bin/sh\necho "{export_output(source, size_mb=1)}"\n')
    public = tmp_path / "public"
    public.mkdir()
    mad = oned.start("-w", "3", "-m", "http")
    mad.send("INIT")  # once answered, the wrapper has exec'd the MAD: its cmdline is final
    assert mad.next_line() == "INIT SUCCESS\n"
    attrs = {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(public)}
    try:
        mad.request(
            "IMPORT", 71, import_payload("http", attrs, app=app_xml(id=71), datastore=FAKEDS)
        )
        # our import runs in a fork of the MAD (same command line), not in a new interpreter
        mad_cmdline = Path(f"/proc/{mad.pid}/cmdline").read_bytes()
        forked = lambda: any(cmdline(c) == mad_cmdline for c in children_of(mad.pid))  # noqa: E731
        until(forked, "a forked child")
        reply = mad.reply()
    finally:
        release.set()
    assert reply == parse_reply("IMPORT FAILURE 71 http import timed out after 3 s\n")
    assert [p for p in public.rglob("*") if not p.is_dir()] == []


def test_large_action_data_reaches_our_drivers_but_not_argv(
    oned: OneLocation, tmp_path: Path
) -> None:
    oned.add_driver("tiny", {"monitor": MONITOR_OK})
    public = tmp_path / "public"
    public.mkdir()
    big = "d" * 300_000  # over Linux's 128 KiB limit for one command-line argument
    mad = oned.start("-m", "http,tiny")
    mad.request("MONITOR", 1, monitor_payload("tiny", {"DESCRIPTION": big}))
    too_big = mad.reply()
    assert not too_big.ok and "too large for a command-line argument" in too_big.info
    mad.request(
        "MONITOR",
        2,
        monitor_payload(
            "http", {"BASE_URL": "http://x/", "PUBLIC_DIR": str(public), "DESCRIPTION": big}
        ),
    )
    assert mad.reply().ok


@pytest.mark.parametrize("proxy", ["http://127.0.0.1:3128"])
def test_proxy_option_reaches_actions(oned: OneLocation, tmp_path: Path, proxy: str) -> None:
    oned.add_driver(
        "tiny",
        {"monitor": '#!/bin/sh\necho "P=$http_proxy,$https_proxy,$HTTP_PROXY,$HTTPS_PROXY"\n'},
    )
    mad = oned.start("-p", proxy)
    mad.request("MONITOR", 1, monitor_payload("tiny"))
    assert mad.reply().decoded() == f"P={proxy},{proxy},{proxy},{proxy}\n".encode()


# ------------------------------------------------------------------------------------------
# units of onemarket.mad, in process


def test_parse_args() -> None:
    assert options.parse_args([]) == options.Options()
    opts = options.parse_args(["-t", "4", "-m", "http, s3,", "-w", "7200", "-p", "http://p:3128"])
    assert opts == options.Options(4, ("http", "s3"), 7200.0, "http://p:3128")
    assert options.parse_args(["--timeout", "0"]).timeout_s is None
    bad_args = (["-t", "0"], ["-t", "x"], ["-w", "-1"], ["-w", "nan"], ["-w", "inf"], ["--what"])
    for bad in (*bad_args, ["extra"], ["-w", "9" * 5000]):
        with pytest.raises(options.UsageError):
            options.parse_args(bad)


def test_installed_scripts_are_recognised_as_ours(oned: OneLocation) -> None:
    for name in ("http", "s3", "one", "linuxcontainers"):
        assert children.is_ours(oned.remotes / "market" / name / "monitor")
    custom = oned.add_driver("tiny", {"monitor": MONITOR_OK}) / "monitor"
    assert not children.is_ours(custom)
    assert not children.is_ours(oned.root / "missing")


def test_scrubber_hides_action_data() -> None:
    data = base64.b64encode(b"<MARKET_DRIVER_ACTION_DATA>secret</MARKET_DRIVER_ACTION_DATA>")
    scrub = failures.Scrubber([data, "short"])
    assert scrub(f"bad {data.decode()}!") == "bad <action data>!"
    assert scrub("short stays") == "short stays"
    assert scrub("https://example.org/a/b/c.qcow2 sha256 " + "a" * 64).endswith("a" * 64)
    # a piece cut out of the payload (a script logging part of its argument) is hidden, with
    # letters glued to it; a long name that merely looks like base64 keeps the failure's cause
    long_payload = base64.b64encode(os.urandom(600)).decode()
    scrub = failures.Scrubber([long_payload])
    assert scrub(f"arg{long_payload[100:400]} failed") == "<base64 data> failed"
    bucket = "mybucket" + "a1b2c3d4" * 30
    assert scrub(f"cannot create s3://{bucket}: invalid name") == (
        f"cannot create s3://{bucket}: invalid name"
    )


def test_outcome_failure_text() -> None:
    assert failures.Outcome(1, errors=["a", "b"]).failure_text("x y") == "a; b"
    assert failures.Outcome(1, killed="x y timed out").failure_text("x y") == "x y timed out"
    assert "exit code 4" in failures.Outcome(4).failure_text("x y")
    assert "SIGKILL" in failures.Outcome(-signal.SIGKILL).failure_text("x y")
    assert not failures.Outcome(0, killed="cancelled").ok and failures.Outcome(0).ok


def test_line_splitter_bounds_long_lines() -> None:
    lines = LineSplitter(max_bytes=1000, keep_bytes=256)
    data = b"INIT\nMONITOR  5 " + b"A" * 5000 + b"\nDELETE  6 abc\r\nlast"
    got = [x for i in range(0, len(data), 777) for x in lines.feed(data[i : i + 777])]
    got += lines.finish()
    assert got[0] == (b"INIT", False)
    assert got[1][1] is True and got[1][0].startswith(b"MONITOR  5 AAA")
    assert len(got[1][0]) <= 256
    assert got[2:] == [(b"DELETE  6 abc\r", False), (b"last", False)]


def test_request_reader_reads_regular_files(tmp_path: Path) -> None:
    path = tmp_path / "requests"
    path.write_bytes(b"INIT\n" * 3)
    got: list[tuple[bytes, bool]] = []

    async def run() -> None:
        done = asyncio.Event()
        with open(path, "rb") as f:
            await driver.RequestReader(lambda *a: got.append(a), done.set).attach(f.fileno())
            await asyncio.wait_for(done.wait(), WAIT_S)

    asyncio.run(run())
    assert got == [(b"INIT", False)] * 3


def test_oversized_request_gets_one_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(driver, "MAX_LINE_BYTES", 1000)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, b"INIT\nMONITOR  5 " + b"A" * 5000 + b"\nFINALIZE\n")
    os.close(in_w)
    installation = Installation.detect({"ONE_LOCATION": str(tmp_path)})
    mad = driver.Mad(options.Options(), installation, out_w, in_r)
    try:
        assert asyncio.run(asyncio.wait_for(mad.run(), WAIT_S)) == 0
        os.close(out_w)
        with os.fdopen(out_r, "rb") as f:
            out = f.read().decode()
    finally:
        os.close(in_r)
    assert out == "INIT SUCCESS\nMONITOR FAILURE 5 action data larger than 1000 bytes\n"


def test_upstream_error_block_is_the_failure_text(oned: OneLocation) -> None:
    script = (
        "#!/bin/sh\necho 'noise before' >&2\necho 'ERROR MESSAGE --8<------' >&2\n"
        "echo 'Error deleting the app' >&2\necho 'ERROR MESSAGE ------>8--' >&2\nexit 1\n"
    )
    oned.add_driver("tiny", {"delete": script})
    mad = oned.start()
    mad.request("DELETE", 4, delete_payload("tiny", app=app_xml(id=4)))
    assert mad.reply() == parse_reply("DELETE FAILURE 4 Error deleting the app\n")


def test_failure_text_keeps_the_last_lines(oned: OneLocation) -> None:
    lines = "".join(f"echo 'warning {i}' >&2\n" for i in range(150))
    oned.add_driver("tiny", {"monitor": f"#!/bin/sh\n{lines}echo 'the real cause' >&2\nexit 1\n"})
    mad = oned.start()
    mad.request("MONITOR", 5, monitor_payload("tiny"))
    reply = mad.reply()
    assert not reply.ok
    assert "the real cause" in reply.info


def test_template_app_delete_succeeds_even_for_a_disabled_driver(oned: OneLocation) -> None:
    mad = oned.start("-m", "http")
    mad.request("DELETE", 6, delete_payload("one", app=app_xml(id=6, type=2)))
    assert mad.reply() == parse_reply("DELETE SUCCESS 6 -\n")


def test_defaultrc_variables_reach_the_actions(oned: OneLocation, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    (oned.root / "etc").mkdir(exist_ok=True)
    (oned.root / "etc" / "defaultrc").write_text("ONE_MARKET_TEST_RC=from-defaultrc\n")
    oned.add_driver("tiny", {"monitor": f'#!/bin/sh\necho "$ONE_MARKET_TEST_RC" > "{out}"\n'})
    mad = oned.start()
    mad.request("MONITOR", 8, monitor_payload("tiny"))
    assert mad.reply().ok
    assert out.read_text().strip() == "from-defaultrc"
