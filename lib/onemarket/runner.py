"""One action, start to end: decode the payload, call the backend, print the result.

Used by the action executables (``remotes/market/<driver>/<action>``, upstream calling
convention ``<base64> <id>``; ``-`` instead of the base64 reads it from stdin) and by the MAD,
which calls :func:`run_action` in a forked child. Exit status 0 means stdout holds the result;
otherwise stderr holds one line for oned's error message. During the action the process's
file descriptor 1 points at stderr, so nothing a library or subprocess prints can corrupt the
result.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import traceback
from pathlib import Path

from . import driverlog
from .action import MAX_BASE64_BYTES, MAX_PAYLOAD_BYTES, ActionData, decode_action
from .backends.base import Context, ImportRequest
from .errors import MarketError, NotSupportedError, PayloadError, one_line
from .installation import Installation
from .progress import log_progress
from .registry import ACTIONS, load_backend
from .workflow import ExportAnswer, runs_nothing

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DISPOSE_TIMEOUT_S = 600


def _perform(
    driver: str, action: str, data: ActionData, context: Context, export_fd: int | None
) -> str:
    if runs_nothing(action, data):
        return ""
    backend = load_backend(driver, data.market, context)
    if action == "monitor":
        return backend.monitor().to_template()
    app = data.require_app()
    if action == "delete":
        backend.delete_app(app)
        return ""
    info = data.require_import_info()
    try:
        confirm = ExportAnswer(export_fd, info) if export_fd is not None else None
        result = backend.import_app(ImportRequest(app=app, source=info, confirm=confirm))
    finally:
        # The export's temporary copy is useless once the import ended, even a failed one.
        if info.dispose and info.dispose_cmd:
            _dispose(info.dispose_cmd)
    return result.to_template()


def _dispose(command: str) -> None:
    """Run the export's clean-up command (DISPOSE=YES), as upstream does after an import."""
    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=DISPOSE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        driverlog.warn(f"clean-up command of the export failed: {exc}")
        return
    if proc.returncode != 0:
        err = one_line(proc.stderr.decode("utf-8", "replace"), 300)
        driverlog.warn(f"clean-up command of the export exited {proc.returncode}: {err}")


def run_action(
    driver: str,
    action: str,
    payload: str | bytes | ActionData,
    installation: Installation | None = None,
    result_fd: int = 1,
    export_fd: int | None = None,
) -> int:
    """Run one action: result to ``result_fd``, failure line to stderr; returns the exit code.

    ``payload`` is oned's base64 action data, or the MAD's already decoded copy (a forked
    child shares it: the data is decoded once per request). ``export_fd``: an import that
    the MAD overlaps with the datastore export reads the export's answer there
    (:class:`workflow.ExportAnswer`)."""
    driverlog.set_debug(driverlog.debug_from_env())
    driverlog.route_std_logging()
    saved = os.dup(result_fd)
    os.dup2(2, result_fd)
    # text buffered before the action (e.g. inherited through a fork) is not the result
    _flush_quietly(sys.__stdout__)
    saved_stdout, saved_stderr = sys.stdout, sys.stderr
    # Python-level output of the action goes to stderr with secrets masked: the MAD turns
    # stderr into log lines and the failure text.
    sys.stdout = sys.stderr = driverlog.ScrubbingStream(saved_stderr)
    result = ""
    code = EXIT_FAILED
    try:
        if action not in ACTIONS:
            raise NotSupportedError(f"unknown marketplace action '{action}'")
        inst = installation or Installation.detect()
        context = Context(
            installation=inst,
            progress=log_progress(f"{driver} {action}") if action == "import" else None,
        )
        data = payload if isinstance(payload, ActionData) else decode_action(payload)
        result = _perform(driver, action, data, context, export_fd)
        code = EXIT_OK
    except MarketError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"{driver} {action} interrupted")
    except SystemExit as exc:
        # a library calling sys.exit() must not turn into an exit 0 with no result
        _fail(f"internal error in {driver} {action}: unexpected exit ({exc.code})")
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, never a traceback
        driverlog.debug(traceback.format_exc())
        _fail(f"internal error in {driver} {action}: {type(exc).__name__}: {exc}")
    finally:
        # Whatever was written to sys.stdout or sys.__stdout__ during the action is flushed
        # while fd 1 still points at stderr, so it can never follow the result on stdout.
        _flush_quietly(sys.stdout)
        _flush_quietly(sys.stderr)
        _flush_quietly(sys.__stdout__)
        sys.stdout, sys.stderr = saved_stdout, saved_stderr
        os.dup2(saved, result_fd)
        os.close(saved)
    if code == EXIT_OK and result:
        _write_all(result_fd, result.encode("utf-8"))
    return code


def _flush_quietly(stream: object) -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()  # type: ignore[attr-defined]


def _fail(message: str) -> None:
    sys.stderr.write(driverlog.scrub(one_line(message)) + "\n")
    sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_payload(arg: str | None) -> str:
    """The argument, or with ``-`` (or none) stdin: at most MAX_BASE64_BYTES of it, a longer one
    refused before more is read (read whole, 300 MB peaked at 610 MB before being refused)."""
    if arg is not None and arg != "-":
        return arg
    data = sys.stdin.buffer.read(MAX_BASE64_BYTES + 1)
    if len(data) > MAX_BASE64_BYTES:
        raise PayloadError(f"action data larger than {MAX_PAYLOAD_BYTES} bytes")
    return data.decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``remotes/market/<driver>/<action>`` and of ``one-market-action``."""
    args = list(sys.argv if argv is None else argv)
    prog = Path(args[0])
    if prog.name in ACTIONS:
        driver, action, rest = prog.parent.name, prog.name, args[1:]
    elif len(args) >= 3:
        driver, action, rest = args[1], args[2], args[3:]
    else:
        sys.stderr.write("usage: one-market-action DRIVER ACTION [BASE64|-] [ID]\n")
        return EXIT_USAGE
    try:
        payload = _read_payload(rest[0] if rest else None)
    except PayloadError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except (OSError, UnicodeDecodeError) as exc:
        _fail(str(PayloadError(f"cannot read action data: {exc}")))
        return EXIT_FAILED
    return run_action(driver, action, payload)


if __name__ == "__main__":
    sys.exit(main())
