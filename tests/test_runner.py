"""One action end to end: in-process with a fake backend, and the real action executables.

The fake backend below is registered in ``registry.DRIVERS`` for in-process tests and, for
subprocess tests, by a small launcher that registers it before calling ``runner.main``. Its
behaviour is chosen by the market attribute ``MODE``.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from onemarket import driverlog, registry, runner
from onemarket.action import App
from onemarket.backends.base import (
    AppEntry,
    Backend,
    ImportRequest,
    ImportResult,
    MonitorResult,
)
from onemarket.errors import StorageError
from onemarket.installation import Installation
from onemarket.template import parse_template

from tests.payloads import (
    app_xml,
    delete_payload,
    import_info_xml,
    import_payload,
    monitor_payload,
)

REPO = Path(__file__).resolve().parents[1]
REMOTES = REPO / "remotes" / "market"
SECRET = "s3cr3t-Key/With+Chars=="
SUBPROCESS_TIMEOUT_S = 60


class FakeBackend(Backend):
    driver = "fake"

    def _record(self, what: str) -> None:
        record = self.market.attr("RECORD")
        if record:
            with open(record, "a", encoding="utf-8") as f:
                f.write(what + "\n")

    def _misbehave(self) -> None:
        mode = self.market.attr("MODE", "")
        if mode == "noisy":
            print("stray print")
            sys.stdout.write("stray sys.stdout\n")
            sys.__stdout__.write("stray sys.__stdout__ unflushed\n")
            os.write(1, b"stray fd 1\n")
            subprocess.run(["sh", "-c", "echo stray child stdout"], check=True)
            logging.getLogger("botocore.endpoint").warning("library warning")
            logging.getLogger("urllib3").debug("library debug")
            driverlog.info("working")
        elif mode == "fail":
            raise StorageError("marketplace folder /srv/market is full")
        elif mode == "crash":
            raise ValueError("unexpected\nmulti-line state")
        elif mode == "exit":
            sys.exit(0)
        elif mode == "secret":
            secret = self.market.attr("SECRET", "")
            driverlog.redact(secret)
            driverlog.info(f"signing with {secret}")
            driverlog.warn(f"retrying with key {secret}")
            print(f"debug dump {secret}")
            raise PermissionError(f"access denied for key {secret}")

    def monitor(self) -> MonitorResult:
        self._record("monitor")
        self._misbehave()
        return MonitorResult(used_mb=1, free_mb=2, total_mb=3, apps=[FAKE_APP])

    def delete_app(self, app: App) -> None:
        self._record(f"delete {app.id}")
        self._misbehave()

    def import_app(self, request: ImportRequest) -> ImportResult:
        self._record(f"import {request.app.id} {request.source.source}")
        self._misbehave()
        return ImportResult(
            source=f"http://market.example/{request.app.id}",
            md5=request.source.md5,
            size_mb=request.source.size_mb,
            format=request.source.format,
        )


FAKE_TARGET = "tests.test_runner:FakeBackend"
FAKE_APP = AppEntry(name='app "one"', description="line\nbreak ]]> \\")


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(registry.DRIVERS, "fake", FAKE_TARGET)
    return "fake"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test gets its own ONE_LOCATION, secrets, log stream and root logger set-up."""
    monkeypatch.setenv("ONE_LOCATION", str(tmp_path / "one"))
    monkeypatch.delenv("ONE_MARKET_DEBUG", raising=False)
    monkeypatch.setattr(driverlog, "stream", None)
    monkeypatch.setattr(driverlog, "_secrets", ())
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        driverlog.set_debug(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def _run(capfd: pytest.CaptureFixture[str], driver: str, action: str, payload: str):
    code = runner.run_action(driver, action, payload, Installation.detect())
    out, err = capfd.readouterr()
    return code, out, err


def _failure_lines(err: str) -> list[str]:
    """stderr lines that the MAD would turn into the failure text (not LOG lines)."""
    prefixes = ("INFO:", "WARN:", "ERROR:", "DEBUG:")
    return [line for line in err.splitlines() if line and not line.startswith(prefixes)]


# --------------------------------------------------------------------------- in-process


def test_monitor_result_only_on_stdout(capfd, fake_driver) -> None:
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "noisy"}))
    assert code == 0, err
    expected = MonitorResult(1, 2, 3, [FAKE_APP])
    assert out == expected.to_template()
    tmpl = parse_template(out)
    assert tmpl.get("TOTAL_MB") == "3" and len(tmpl.get_all("APP")) == 1
    for stray in ("stray print", "stray sys.stdout", "unflushed", "stray fd 1", "child stdout"):
        assert stray in err and stray not in out
    assert "WARN: botocore.endpoint: library warning" in err
    assert "library debug" not in err
    assert "INFO: working" in err


def test_result_fd_and_std_streams_restored(capfd, fake_driver) -> None:
    saved_stdout = sys.stdout
    code, out, _ = _run(capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "noisy"}))
    assert code == 0 and out.startswith("USED_MB")
    assert sys.stdout is saved_stdout or sys.stdout is sys.__stdout__
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_failure_is_one_line_on_stderr(capfd, fake_driver) -> None:
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "fail"}))
    assert code == runner.EXIT_FAILED
    assert out == ""
    assert _failure_lines(err) == ["marketplace folder /srv/market is full"]


def test_unexpected_exception_is_internal_error_without_traceback(capfd, fake_driver) -> None:
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "crash"}))
    assert code == 1 and out == ""
    assert _failure_lines(err) == [
        "internal error in fake monitor: ValueError: unexpected; multi-line state"
    ]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capfd, fake_driver, monkeypatch) -> None:
    monkeypatch.setenv("ONE_MARKET_DEBUG", "1")
    try:
        code, _, err = _run(
            capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "crash"})
        )
    finally:
        driverlog.set_debug(False)
    assert code == 1
    assert "DEBUG: Traceback (most recent call last):" in err
    assert _failure_lines(err)[-1].startswith("internal error in fake monitor")


def test_sys_exit_in_a_backend_is_a_failure(capfd, fake_driver) -> None:
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake", {"MODE": "exit"}))
    assert code == 1 and out == ""
    assert _failure_lines(err) == ["internal error in fake monitor: unexpected exit (0)"]


def test_secrets_never_appear(capfd, fake_driver) -> None:
    attrs = {"MODE": "secret", "SECRET": SECRET}
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake", attrs))
    assert code == 1
    assert SECRET not in out and SECRET not in err
    assert "INFO: signing with ****" in err
    assert _failure_lines(err)[-1] == (
        "internal error in fake monitor: PermissionError: access denied for key ****"
    )


def test_import_prints_the_four_attributes(capfd, fake_driver, tmp_path) -> None:
    info = import_info_xml("/var/tmp/img", md5="a" * 32, size_mb=42, format="qcow2")
    payload = import_payload("fake", {"RECORD": str(tmp_path / "rec")}, import_info=info)
    code, out, err = _run(capfd, fake_driver, "import", payload)
    assert code == 0, err
    assert parse_template(out).as_dict() == {
        "SOURCE": "http://market.example/7",
        "MD5": "a" * 32,
        "SIZE": "42",
        "FORMAT": "qcow2",
    }
    assert (tmp_path / "rec").read_text() == "import 7 /var/tmp/img\n"


def test_import_without_import_info_fails(capfd, fake_driver) -> None:
    code, out, err = _run(capfd, fake_driver, "import", import_payload("fake"))
    assert code == 1 and out == ""
    assert _failure_lines(err) == ["action data has no IMPORT_SOURCE"]


@pytest.mark.parametrize("import_fails", [False, True])
def test_dispose_runs_after_the_import(capfd, fake_driver, tmp_path, import_fails) -> None:
    marker = tmp_path / "disposed"
    info = import_info_xml(
        "/var/tmp/img", md5="b" * 32, size_mb=1, dispose=True, dispose_cmd=f"touch '{marker}'"
    )
    attrs = {"RECORD": str(tmp_path / "rec"), "MODE": "fail" if import_fails else ""}
    code, _, err = _run(capfd, fake_driver, "import", import_payload("fake", attrs, None, info))
    assert code == (1 if import_fails else 0), err
    assert marker.exists()
    assert (tmp_path / "rec").read_text().startswith("import 7")


def test_no_dispose_when_not_asked(capfd, fake_driver, tmp_path) -> None:
    marker = tmp_path / "disposed"
    info = import_info_xml("/x", dispose=False, dispose_cmd=f"touch '{marker}'")
    code, _, err = _run(capfd, fake_driver, "import", import_payload("fake", None, None, info))
    assert code == 0, err
    assert not marker.exists()


def test_failed_dispose_is_a_warning(capfd, fake_driver) -> None:
    info = import_info_xml("/x", dispose=True, dispose_cmd="echo gone wrong >&2; exit 3")
    code, out, err = _run(capfd, fake_driver, "import", import_payload("fake", None, None, info))
    assert code == 0 and out.startswith("SOURCE")
    assert "WARN: clean-up command of the export exited 3: gone wrong" in err


@pytest.mark.parametrize("app_type", [2, 3])
def test_delete_of_templates_does_nothing(capfd, fake_driver, tmp_path, app_type) -> None:
    payload = delete_payload("fake", {"RECORD": str(tmp_path / "rec")}, app_xml(type=app_type))
    code, out, err = _run(capfd, fake_driver, "delete", payload)
    assert (code, out) == (0, "")
    assert not (tmp_path / "rec").exists()
    assert _failure_lines(err) == []


def test_delete_of_an_image(capfd, fake_driver, tmp_path) -> None:
    payload = delete_payload("fake", {"RECORD": str(tmp_path / "rec")}, app_xml(id=9))
    code, out, _ = _run(capfd, fake_driver, "delete", payload)
    assert (code, out) == (0, "")
    assert (tmp_path / "rec").read_text() == "delete 9\n"


def test_delete_without_app(capfd, fake_driver) -> None:
    code, _, err = _run(capfd, fake_driver, "delete", monitor_payload("fake"))
    assert code == 1
    assert _failure_lines(err) == ["action data has no MARKETPLACEAPP"]


def test_unknown_action_and_bad_payload(capfd, fake_driver) -> None:
    code, _, err = _run(capfd, fake_driver, "export", monitor_payload("fake"))
    assert code == 1 and _failure_lines(err) == ["unknown marketplace action 'export'"]
    code, _, err = _run(capfd, fake_driver, "monitor", "%%%")
    assert code == 1 and _failure_lines(err) == ["action data is not valid base64"]


def test_unknown_and_unbuilt_drivers(capfd, monkeypatch) -> None:
    code, _, err = _run(capfd, "nosuch", "monitor", monitor_payload("nosuch"))
    assert code == 1 and _failure_lines(err) == ["Marketplace driver 'nosuch' not available"]
    monkeypatch.setitem(registry.DRIVERS, "future", "onemarket.backends.future_driver:Future")
    code, _, err = _run(capfd, "future", "monitor", monitor_payload("future"))
    assert code == 1
    assert _failure_lines(err) == [
        "marketplace driver 'future' is not built in this version of onemarket"
    ]


def test_main_usage(capfd) -> None:
    assert runner.main(["one-market-action"]) == runner.EXIT_USAGE
    assert "usage:" in capfd.readouterr().err


# --------------------------------------------------------------------------- subprocesses


def _launcher(tmp_path: Path, driver: str, action: str, target: str | None) -> Path:
    """An action executable at ``<tmp>/<driver>/<action>`` that registers ``target`` first."""
    folder = tmp_path / "remotes" / driver
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / action
    register = f"registry.DRIVERS[{driver!r}] = {target!r}\n" if target else ""
    script.write_text(
        textwrap.dedent(
            """\
            import sys
            from onemarket import registry
            {register}from onemarket.runner import main
            sys.exit(main())
            """
        ).format(register=register)
    )
    return script


def _spawn(
    script: Path, args: list[str], tmp_path: Path, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "ONE_MARKET_DEBUG"}
    environ.update(
        ONE_LOCATION=str(tmp_path / "one"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")])),
        **env,
    )
    return subprocess.run(
        [sys.executable, str(script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        cwd=str(tmp_path),
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_subprocess_noisy_backend_keeps_stdout_clean(tmp_path) -> None:
    script = _launcher(tmp_path, "fake", "monitor", FAKE_TARGET)
    proc = _spawn(script, [monitor_payload("fake", {"MODE": "noisy"}), "5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = MonitorResult(1, 2, 3, [FAKE_APP])
    assert proc.stdout == expected.to_template()
    assert "stray child stdout" in proc.stderr and "unflushed" in proc.stderr


def test_subprocess_payload_on_stdin(tmp_path) -> None:
    script = _launcher(tmp_path, "fake", "monitor", FAKE_TARGET)
    proc = _spawn(script, ["-", "5"], tmp_path, stdin=monitor_payload("fake"))
    assert proc.returncode == 0, proc.stderr
    assert parse_template(proc.stdout).get("USED_MB") == "1"
    proc = _spawn(script, [], tmp_path, stdin=monitor_payload("fake"))
    assert proc.returncode == 0, proc.stderr


def test_stdin_past_the_bound_is_refused_after_reading_one_byte_more(monkeypatch, capsys) -> None:
    """Read whole, 300 MB of stdin peaked at 610 MB before this same refusal."""
    monkeypatch.setattr(runner, "MAX_BASE64_BYTES", 100)
    stdin = io.BytesIO(b"A" * 10_000)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
    assert runner.main(["one-market-action", "fake", "monitor", "-", "1"]) == runner.EXIT_FAILED
    assert stdin.tell() == 100 + 1  # never read to the end
    err = capsys.readouterr().err
    assert err == f"action data larger than {runner.MAX_PAYLOAD_BYTES} bytes\n"


def test_subprocess_failure_secret_and_traceback(tmp_path) -> None:
    script = _launcher(tmp_path, "fake", "monitor", FAKE_TARGET)
    payload = monitor_payload("fake", {"MODE": "secret", "SECRET": SECRET})
    proc = _spawn(script, [payload, "5"], tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert SECRET not in proc.stderr
    assert _failure_lines(proc.stderr) == [
        "debug dump ****",
        "internal error in fake monitor: PermissionError: access denied for key ****",
    ]
    proc = _spawn(script, [monitor_payload("fake", {"MODE": "crash"}), "5"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert _failure_lines(proc.stderr) == [
        "internal error in fake monitor: ValueError: unexpected; multi-line state"
    ]
    proc = _spawn(
        script, [monitor_payload("fake", {"MODE": "crash"}), "5"], tmp_path, ONE_MARKET_DEBUG="1"
    )
    assert "DEBUG: Traceback" in proc.stderr


def test_subprocess_unbuilt_driver(tmp_path) -> None:
    script = _launcher(tmp_path, "future", "monitor", "onemarket.catalogs.future_driver:X")
    proc = _spawn(script, [monitor_payload("future"), "1"], tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert _failure_lines(proc.stderr) == [
        "marketplace driver 'future' is not built in this version of onemarket"
    ]


def test_subprocess_unknown_driver_folder(tmp_path) -> None:
    script = _launcher(tmp_path, "nosuch", "delete", None)
    proc = _spawn(script, [delete_payload("nosuch"), "1"], tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert _failure_lines(proc.stderr) == ["Marketplace driver 'nosuch' not available"]


@pytest.mark.parametrize("driver", ["http", "s3", "one", "linuxcontainers"])
def test_real_executables_reject_bad_payloads(tmp_path, driver) -> None:
    for action in ("import", "delete", "monitor"):
        script = REMOTES / driver / action
        assert script.is_file() and os.access(script, os.X_OK), script
        proc = _spawn(script, ["not base64!", "3"], tmp_path)
        assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
        assert _failure_lines(proc.stderr) == ["action data is not valid base64"]


@pytest.mark.parametrize("driver", ["one", "linuxcontainers"])
def test_real_public_catalog_executables_refuse_import_and_delete(tmp_path, driver) -> None:
    info = import_info_xml("/var/tmp/x", md5="c" * 32, size_mb=1)
    proc = _spawn(
        REMOTES / driver / "import", [import_payload(driver, None, None, info), "4"], tmp_path
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert _failure_lines(proc.stderr) == [
        f"marketplace driver '{driver}' is a public catalog: apps cannot be imported"
    ]
    proc = _spawn(REMOTES / driver / "delete", ["-", "4"], tmp_path, stdin=delete_payload(driver))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert _failure_lines(proc.stderr) == [
        f"marketplace driver '{driver}' is a public catalog: apps cannot be deleted"
    ]


@pytest.mark.parametrize("driver", ["http", "s3", "one", "linuxcontainers"])
def test_real_executables_skip_template_apps_on_delete(tmp_path, driver) -> None:
    proc = _spawn(
        REMOTES / driver / "delete", [delete_payload(driver, None, app_xml(type=2)), "1"], tmp_path
    )
    assert (proc.returncode, proc.stdout, _failure_lines(proc.stderr)) == (0, "", [])


def test_real_http_monitor_missing_attributes(tmp_path) -> None:
    proc = _spawn(REMOTES / "http" / "monitor", [monitor_payload("http", {}), "2"], tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    lines = _failure_lines(proc.stderr)
    assert len(lines) == 1 and "PUBLIC_DIR" in lines[0], proc.stderr


# --------------------------------------------------------------------------- driverlog


def test_log_lines_prefixed_one_line_and_masked(monkeypatch) -> None:
    import io

    out = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", out)
    monkeypatch.setattr(driverlog, "_secrets", ())
    driverlog.redact("abc")  # too short to mask without masking everything
    driverlog.redact("secret")
    driverlog.redact("secret-longer")
    driverlog.info("one\ntwo\r\n\nsecret-longer and secret\n")
    driverlog.warn("w\nERROR: forged\x1b[2J")
    driverlog.error("e")
    driverlog.debug("hidden")
    driverlog.info(" \n ")
    assert out.getvalue().splitlines() == [
        "INFO: one\\ntwo\\r\\n\\n**** and ****",
        "WARN: w\\nERROR: forged\\x1b[2J",
        "ERROR: e",
    ]


def test_scrubbing_stream_masks_secrets_split_across_writes(monkeypatch) -> None:
    import io

    monkeypatch.setattr(driverlog, "_secrets", ())
    driverlog.redact(SECRET)
    target = io.StringIO()
    s = driverlog.ScrubbingStream(target)
    half = len(SECRET) // 2
    s.write("key=" + SECRET[:half])
    s.write(SECRET[half:] + "\nnext ")
    assert target.getvalue() == "key=****\n"
    s.write(SECRET)
    s.flush()
    assert target.getvalue() == "key=****\nnext ****"


def test_redact_while_other_threads_log(monkeypatch) -> None:
    import io
    import threading

    monkeypatch.setattr(driverlog, "_secrets", ())
    monkeypatch.setattr(driverlog, "stream", io.StringIO())
    errors: list[BaseException] = []

    def logger() -> None:
        try:
            for i in range(2000):
                driverlog.info(f"line {i} secret-{i % 50:04d}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=logger) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(50):
        driverlog.redact(f"secret-{i:04d}")
    for t in threads:
        t.join(60)
    assert not errors
    assert driverlog.scrub("secret-0049") == "****"


def test_std_logging_goes_to_stderr_lines(capfd) -> None:
    driverlog.route_std_logging()
    logging.getLogger("boto3.resources").error("bad thing")
    logging.getLogger("botocore.hooks").debug("chatter")
    logging.getLogger("some.lib").warning("careful")
    out, err = capfd.readouterr()
    assert out == ""
    assert "ERROR: boto3.resources: bad thing" in err
    assert "WARN: some.lib: careful" in err
    assert "chatter" not in err


def test_std_logging_masks_request_signatures(capfd) -> None:
    # ONE_MARKET_DEBUG in the MAD's environment: botocore's DEBUG lines reach oned.log, never
    # with an Authorization header, a signature or a presigned URL's credential
    driverlog.set_debug(True)
    try:
        driverlog.route_std_logging()
        log = logging.getLogger("botocore.auth")
        log.debug("Signature:\n8f2a0c")
        log.debug(
            "Sending http request: <AWSPreparedRequest headers={'Authorization': "
            "b'AWS4-HMAC-SHA256 "
            "Credential=AKIDEXAMPLE/20261201/us-east-1/s3/aws4_request, Signature=deadbeef'}>"
        )
        log.debug("GET /b/k?X-Amz-Credential=AKIDEXAMPLE%2F2026&X-Amz-Signature=cafe HTTP/1.1")
    finally:
        driverlog.set_debug(False)
        driverlog.route_std_logging()
    _, err = capfd.readouterr()
    assert "DEBUG: botocore.auth" in err
    for secret in ("AKIDEXAMPLE", "deadbeef", "cafe", "8f2a0c"):
        assert secret not in err


def test_text_buffered_before_the_action_never_reaches_the_result(
    capfd, fake_driver, monkeypatch
) -> None:
    import io

    # a buffered stdout whatever PYTHONUNBUFFERED says, as a forked MAD child may inherit it
    buffered = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16))
    monkeypatch.setattr(sys, "__stdout__", buffered)
    buffered.write("buffered before the action\n")
    code, out, err = _run(capfd, fake_driver, "monitor", monitor_payload("fake"))
    assert code == 0
    assert out == MonitorResult(1, 2, 3, [FAKE_APP]).to_template()
    assert "buffered before the action" in err


def test_subprocess_payload_larger_than_an_argument_can_be(tmp_path) -> None:
    """Linux caps one argument at 128 KiB: big payloads travel on stdin with ``-``."""
    script = _launcher(tmp_path, "fake", "monitor", FAKE_TARGET)
    payload = monitor_payload("fake", {"BIG": "x" * 2_000_000})
    assert len(payload) > 2 * 131072
    proc = _spawn(script, ["-", "8"], tmp_path, stdin=payload)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert parse_template(proc.stdout).get("TOTAL_MB") == "3"
