"""The driver loop: oned's requests in, one reply each out, at most ``-t`` actions at once.

One single-threaded asyncio loop reads oned's requests on stdin and writes the replies and
``LOG`` lines on stdout, one whole line per write, so concurrent actions never interleave.
Action data is decoded once here and never written to any log: it may carry credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import protocol
from ..action import ActionData, ImportInfo, decode_action
from ..errors import MarketError, one_line
from ..installation import Installation
from ..registry import DRIVERS, backend_class
from ..template import parse_template
from ..workflow import (
    SAFE_NAME_RE,
    Confirmation,
    confirms,
    export_step,
    overlap_guess,
    runs_nothing,
    with_export_result,
)
from .children import (
    KILL_GRACE_S,
    MAX_RESULT_BYTES,
    STOP_SIGNALS,
    Child,
    Spawned,
    fork_runner,
    is_ours,
    spawn_program,
)
from .failures import Outcome, Scrubber
from .lines import LineSplitter
from .options import Options

STOP_GRACE_S = 5.0
"""The kill grace when oned stops the MAD (FINALIZE or EOF): oned SIGKILLs the MAD 10 s after
FINALIZE (``Driver::stop_driver``, MarketPlaceManager ``drivers_timeout``), so running actions
are SIGTERMed at once and SIGKILLed after this, and the MAD exits well before oned's kill."""
STOP_DEADLINE_S = 8.0
"""Longest time from FINALIZE or EOF to the MAD's exit, whatever its children do."""
MAX_LINE_BYTES = 48 * 1024 * 1024
"""Longest request line buffered from oned (the largest action data, base64); held in memory."""
LINE_PREFIX_BYTES = 256
"""Start of an over-long request line kept to answer it (action and id)."""
MAX_EXPORT_OUTPUT_BYTES = 1024 * 1024
"""Largest stdout accepted from a datastore export: its ``<IMPORT_INFO>`` is a few hundred
bytes, and it is parsed in the MAD's loop, so a runaway export cannot stall other requests."""
READ_CHUNK_BYTES = 64 * 1024
"""Bytes read at a time from oned when its input cannot be polled (a regular file)."""
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def log(message: str) -> None:
    """A line in the MAD's own log (its stderr, which the launcher sends to one_market.log)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write(f"{stamp} one_market: {one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def write_all(fd: int, data: bytes) -> None:
    """Write every byte, waiting when the descriptor happens to be non-blocking."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class RequestReader(asyncio.Protocol):
    """oned's request lines, bounded (:class:`LineSplitter`), then ``on_eof`` once."""

    def __init__(self, on_line: Callable[[bytes, bool], None], on_eof: Callable[[], None]) -> None:
        self._on_line = on_line
        self._on_eof = on_eof
        self._lines = LineSplitter(MAX_LINE_BYTES, LINE_PREFIX_BYTES)
        self.closed = False

    def data_received(self, data: bytes) -> None:
        for line, truncated in self._lines.feed(data):
            if self.closed:
                return
            self._on_line(line, truncated)

    def eof_received(self) -> bool:
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log(f"cannot read from oned: {exc}")
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        for line, truncated in self._lines.finish():
            self._on_line(line, truncated)
        self.closed = True
        self._on_eof()

    async def attach(self, fd: int) -> Callable[[], None]:
        """Read ``fd`` through a pipe transport; a regular file (which cannot be polled and never
        blocks) is read one chunk per loop turn. Returns how to stop reading."""
        loop = asyncio.get_running_loop()
        try:
            pipe = open(fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 - transport owns it
            transport, _ = await loop.connect_read_pipe(lambda: self, pipe)
        except (ValueError, OSError):
            handle = loop.call_soon(self._read_file, loop, fd)
            return handle.cancel
        return transport.close

    def _read_file(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if self.closed:
            return
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        self.data_received(data)
        loop.call_soon(self._read_file, loop, fd)


@dataclass(eq=False)
class Pending:
    """A request accepted from oned and not answered yet (each one itself: an overlapped
    import's copy has the same request and fields as its request, and is another)."""

    request: protocol.Request
    cancelled: str = ""
    child: Child | None = None


class Mad:
    """The driver: reads requests, runs at most ``-t`` of them at once, answers each once."""

    def __init__(
        self, options: Options, installation: Installation, out_fd: int, in_fd: int = 0
    ) -> None:
        self.options = options
        self.installation = installation
        self.market_dir = installation.market_remotes
        self.datastore_dir = installation.datastore_remotes
        if options.drivers is not None:
            self.enabled = frozenset(options.drivers)
        else:
            self.enabled = frozenset(self.driver_folders())
        self._out_fd = out_fd
        self._in_fd = in_fd
        self._env = dict.fromkeys(PROXY_VARIABLES, options.proxy) if options.proxy else {}
        self._pending: dict[int, list[Pending]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stdout_broken = False
        self._stopping = ""
        """Why the MAD stops (FINALIZE, EOF, a signal); empty while it serves."""
        self._preloaded = False

    def driver_folders(self) -> list[str]:
        try:
            return sorted(p.name for p in self.market_dir.iterdir() if p.is_dir())
        except OSError:
            return []

    # -- main loop
    async def run(self) -> int:
        """Serve until FINALIZE, EOF or a stop signal; then end every action and return.

        oned's stop (``Driver::stop_driver``) writes FINALIZE and closes both pipes at once, and
        a crashed oned closes them without FINALIZE: either way nobody reads the replies any
        more. So both mean the same here: no queued request is started, running actions are
        SIGTERMed (they clean up as on a timeout), SIGKILLed after STOP_GRACE_S, and the MAD
        returns within STOP_DEADLINE_S.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._sem = asyncio.Semaphore(self.options.concurrency)
        self._reader = RequestReader(self._on_line, lambda: self.shutdown("oned closed its pipe"))
        for sig in STOP_SIGNALS:  # after the reader: shutdown() closes it
            loop.add_signal_handler(sig, self._on_signal, sig)
        stop_reading = await self._reader.attach(self._in_fd)
        await self._stop.wait()
        stop_reading()
        deadline = loop.time() + STOP_DEADLINE_S
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        for task in list(self._tasks):  # children that survive SIGKILL (D state): give up
            task.cancel()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        return 0

    def shutdown(self, why: str) -> None:
        """Stop serving: no more requests, fail what is queued, end what runs."""
        if self._stopping:
            return
        self._stopping = why
        busy = sum(1 for same in self._pending.values() for p in same if p.child is not None)
        log(f"stopping ({why}): {busy} running actions ended, queued ones not started")
        self._reader.closed = True
        for id_ in list(self._pending):
            self.cancel(id_, f"the marketplace driver stopped ({why})", STOP_GRACE_S)
        self._stop.set()

    def reply(self, line: str) -> None:
        """One whole line to oned (the loop is single-threaded: lines never interleave)."""
        if self._stdout_broken:
            return
        try:
            write_all(self._out_fd, line.encode("utf-8", "replace"))
        except OSError as exc:
            self._stdout_broken = True
            log(f"cannot write to oned ({exc.strerror}); replies are dropped from now on")

    def _on_line(self, raw: bytes, truncated: bool) -> None:
        try:
            req = protocol.parse_request(raw.decode("utf-8", "replace"))
        except protocol.ProtocolError as exc:
            log(f"ignored a line from oned: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a parse bug must not drop the lines after it
            log(f"ignored a line from oned: internal error ({type(exc).__name__})")
            return
        if req.action == "INIT":
            self.reply(protocol.init_success())
            if not self._preloaded:  # after the answer: oned waits only 10 s for it
                self._preloaded = True
                self._loop.call_soon(preload, self.enabled)
        elif req.action == "FINALIZE":
            self.shutdown("oned sent FINALIZE")
        elif self._stopping:
            return  # lines after FINALIZE: oned reads no reply any more
        elif req.action == "DRIVER_CANCEL":
            self.cancel(req.id, "action cancelled by oned")
        elif truncated:
            why = f"action data larger than {MAX_LINE_BYTES} bytes"
            self.reply(protocol.failure(req.action, req.id, why))
        else:
            pending = self._admit(Pending(req))
            task = self._loop.create_task(self._serve(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self, id_: int, reason: str, grace_s: float = KILL_GRACE_S) -> None:
        for pending in self._pending.get(id_, []):
            self.cancel_pending(pending, reason, grace_s)

    @staticmethod
    def cancel_pending(pending: Pending, reason: str, grace_s: float = KILL_GRACE_S) -> None:
        pending.cancelled = reason
        if pending.child is not None:
            pending.child.kill(reason, grace_s)

    def _on_signal(self, sig: int) -> None:
        self.shutdown(f"{signal.Signals(sig).name} received")

    async def _serve(self, pending: Pending) -> None:
        req = pending.request
        try:
            async with self._sem:
                if pending.cancelled:
                    line = protocol.failure(req.action, req.id, pending.cancelled)
                else:
                    line = await self._handle(pending)
        except Exception as exc:  # noqa: BLE001 - one request must never stop the MAD
            detail = Scrubber([req.payload])(f"{type(exc).__name__}: {exc}")
            log(f"internal error on {req.action} {req.id}: {detail}")
            line = protocol.failure(
                req.action,
                req.id,
                f"internal error in the marketplace driver ({type(exc).__name__})",
            )
        finally:
            self.forget(pending)
        self.reply(line)

    def _admit(self, pending: Pending) -> Pending:
        """Track ``pending`` under oned's id, for DRIVER_CANCEL and the MAD's stop."""
        self._pending.setdefault(pending.request.id, []).append(pending)
        return pending

    def forget(self, pending: Pending) -> None:
        same_id = self._pending.get(pending.request.id, [])
        if pending in same_id:
            same_id.remove(pending)
        if not same_id:
            self._pending.pop(pending.request.id, None)

    # -- actions
    async def _handle(self, pending: Pending) -> str:
        req = pending.request
        try:
            data = decode_action(req.payload)
        except MarketError as exc:
            return protocol.failure(req.action, req.id, str(exc))
        if runs_nothing(req.action, data):
            return protocol.success("DELETE", req.id, "-")  # templates have no file, any driver
        driver = data.market.driver
        if not driver:
            return protocol.failure(req.action, req.id, "action data has no MARKET_MAD")
        if driver not in self.enabled or not SAFE_NAME_RE.fullmatch(driver):
            shown = one_line(driver, 64)
            return protocol.failure(
                req.action, req.id, f"Marketplace driver '{shown}' not available"
            )
        if req.action == "IMPORT":
            return await self._import(pending, data, driver)
        action = req.action.lower()
        outcome = await self._market_action(pending, driver, action, data)
        return self._result(req, outcome, f"{driver} {action}")

    async def _import(self, pending: Pending, data: ActionData, driver: str) -> str:
        req = pending.request

        def fail(message: str) -> str:
            return protocol.failure("IMPORT", req.id, message)

        try:
            step = export_step(data, self.datastore_dir)
        except MarketError as exc:
            return fail(str(exc))
        guess = overlap_guess(data) if is_ours(self.market_dir / driver / "import") else None
        copy = self._start_copy(pending, driver, data, guess) if guess is not None else None
        try:
            exported = await self._execute(
                pending,
                step.label,
                lambda: spawn_program(str(step.program), [str(req.id)], self._child_env(), b""),
                [step.payload],
                stdin_data=step.payload + b"\n",  # a whole line, for scripts that `read` it
                max_stdout=MAX_EXPORT_OUTPUT_BYTES,
            )
            full, error = None, ""
            if not exported.ok:
                error = f"Error exporting image to file: {exported.failure_text(step.label)}"
            else:
                try:
                    full = with_export_result(data, exported.stdout)
                except MarketError as exc:
                    error = str(exc)
            if copy is not None and guess is not None:
                info = full.import_info if full is not None else None
                verdict = confirms(guess, info) if info is not None else Confirmation()
                copied = await copy.finish(verdict.answer)
                if verdict.answer and copied.spawned:
                    return await self._imported(pending, data, driver, copied)
                if info is not None:
                    why = verdict.declined or "the copy beside the export did not start"
                    log(f"import {req.id}: {why}, copied after it")
        finally:
            if copy is not None:  # once; again when the export step raised (the MAD's stop)
                await copy.finish(b"")
        if full is None or full.import_info is None:
            return fail(error)
        outcome = await self._market_action(pending, driver, "import", full)
        return await self._imported(pending, data, driver, outcome)

    def _start_copy(
        self, pending: Pending, driver: str, data: ActionData, guess: ImportInfo
    ) -> OverlappedCopy:
        """Start our import on the guessed source beside the export (workflow.overlap_guess).

        It runs as a request of its own for oned's id, so DRIVER_CANCEL, timeouts and the
        MAD's stop end it like any action; it waits for the export's answer before it
        publishes anything."""
        read_fd, write_fd = os.pipe()
        shadow = self._admit(Pending(pending.request, pending.cancelled))
        limit = self.options.timeout_s
        guessed = replace(data, import_info=guess)
        task = self._loop.create_task(
            self._market_action(shadow, driver, "import", guessed, export_fd=read_fd)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return OverlappedCopy(self, shadow, task, (read_fd, write_fd), limit, f"{driver} import")

    async def _imported(
        self, pending: Pending, data: ActionData, driver: str, outcome: Outcome
    ) -> str:
        req = pending.request
        if outcome.ok and self._stopping:
            await self._withdraw(req.id, data, driver, outcome.stdout)
            reason = f"{driver} import withdrawn: {self._stopping}"
            return protocol.failure("IMPORT", req.id, reason)
        return self._result(req, outcome, f"{driver} import")

    async def _withdraw(self, id_: int, data: ActionData, driver: str, output: bytes) -> None:
        """Delete what an import stored once oned can no longer hear of it (FINALIZE or EOF
        came while it finished): an app nobody knows of would hold its space for ever."""
        try:
            source = str(parse_template(output).get("SOURCE") or "")
            payload = data.withdrawal_payload(source).decode("ascii") if source else ""
            delete = decode_action(payload) if payload else None
        except (MarketError, ValueError) as exc:
            log(f"cannot withdraw what import {id_} stored: {exc}")
            return
        if delete is None:
            return
        fresh = Pending(protocol.Request("DELETE", -1, payload))
        outcome = await self._market_action(fresh, driver, "delete", delete, timeout_s=STOP_GRACE_S)
        state = "withdrew" if outcome.ok else "could not withdraw"
        log(f"{state} what import {id_} stored: it finished after the stop")

    def _result(self, req: protocol.Request, outcome: Outcome, label: str) -> str:
        if not outcome.ok:
            return protocol.failure(req.action, req.id, outcome.failure_text(label))
        if not outcome.stdout.strip():
            return protocol.success(req.action, req.id, "-")
        return protocol.success(req.action, req.id, base64.b64encode(outcome.stdout).decode())

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env)
        return env

    async def _market_action(
        self,
        pending: Pending,
        driver: str,
        action: str,
        data: ActionData,
        timeout_s: float | None = None,
        export_fd: int | None = None,
    ) -> Outcome:
        """Run ``remotes/market/<driver>/<action>``: ours in a fork with ``data`` as it is,
        any other with the action data (base64; an import's with the export's IMPORT_INFO
        added) and the id as arguments, as the stock MAD does; ``export_fd`` goes to an
        overlapped import of ours (workflow.ExportAnswer)."""
        path = self.market_dir / driver / action
        label = f"{driver} {action}"
        if not path.is_file():
            why = f"Marketplace driver '{driver}' has no {action} action ({path} not found)"
            return Outcome(127, errors=[why])
        secrets = [pending.request.payload]
        if export_fd is not None and not is_ours(path):  # replaced since the overlap began
            return Outcome(127, errors=[f"{label} changed during the import"], spawned=False)
        if is_ours(path):
            spawn = lambda: fork_runner(driver, action, data, self._env, export_fd)  # noqa: E731
        else:
            payload = pending.request.payload
            if action == "import" and data.import_info is not None:
                payload = data.with_import_info(data.import_info).decode("ascii")
                secrets.append(payload)
            args = [payload, str(pending.request.id)]
            spawn = lambda: spawn_program(str(path), args, self._child_env())  # noqa: E731
        return await self._execute(pending, label, spawn, secrets, timeout_s=timeout_s)

    async def _execute(
        self,
        pending: Pending,
        label: str,
        spawn: Callable[[], Spawned],
        secrets: Sequence[str | bytes],
        stdin_data: bytes | None = None,
        max_stdout: int = MAX_RESULT_BYTES,
        timeout_s: float | None = None,
    ) -> Outcome:
        if pending.cancelled:
            return Outcome(1, killed=pending.cancelled)
        id_ = pending.request.id
        try:
            spawned = spawn()
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                why = "its action data is too large for a command-line argument"
            else:
                why = exc.strerror or type(exc).__name__
            return Outcome(127, errors=[f"cannot run {label}: {why}"], spawned=False)
        child = await Child.start(
            spawned,
            on_log=lambda sev, msg: self.reply(protocol.log(id_, sev, msg)),
            scrub=Scrubber(secrets),
            stdin_data=stdin_data or b"",
            max_stdout=max_stdout,
        )
        pending.child = child
        if pending.cancelled:  # stopped while the pipes were being connected
            child.kill(pending.cancelled, STOP_GRACE_S)
        limit = timeout_s or self.options.timeout_s
        if limit:
            child.set_timeout(limit, f"{label} timed out after {limit:g} s")
        try:
            return await child.outcome()
        finally:
            pending.child = None


class OverlappedCopy:
    """An import of ours copying the guessed source while the export runs, and the pipe its
    child reads the export's answer from (fd handed over at fork, closed here after)."""

    def __init__(
        self,
        mad: Mad,
        shadow: Pending,
        task: asyncio.Task[Outcome],
        pipe: tuple[int, int],
        timeout_s: float,
        label: str,
    ) -> None:
        self._mad = mad
        self._shadow = shadow
        self._task = task
        self._read_fd, self._write_fd = pipe
        self._timeout_s = timeout_s
        self._label = label
        self._finished = False

    async def finish(self, answer: bytes) -> Outcome:
        """Hand ``answer`` over (b"": the export did not confirm; the copy is ended and its
        temporary file removed) and wait for the child's outcome. From the answer on, the
        copy has a whole ``-w`` again, as an import run after the export has. Idempotent:
        a second call (after a cancelled first) only waits."""
        if not self._finished:
            self._finished = True
            child = self._shadow.child
            try:
                if answer:
                    write_all(self._write_fd, answer)  # <= PIPE_BUF into an empty pipe
                    if child is not None and self._timeout_s:
                        why = f"{self._label} timed out after {self._timeout_s:g} s"
                        child.set_timeout(self._timeout_s, why)
                else:
                    self._mad.cancel_pending(self._shadow, "the export did not confirm the source")
            except OSError:
                pass  # the child is gone: its outcome says why
            finally:
                os.close(self._write_fd)
        try:
            return await self._task
        finally:
            if self._read_fd >= 0:
                fd, self._read_fd = self._read_fd, -1
                os.close(fd)
            self._mad.forget(self._shadow)


def preload(drivers: frozenset[str]) -> None:
    """Import the backends of the enabled drivers once, so forked actions start warm."""
    for name in sorted(drivers & DRIVERS.keys()):
        # a driver that cannot load fails with a clear message in its own actions
        with contextlib.suppress(Exception):
            backend_class(name)


def main(options: Options) -> int:
    """Run the MAD with parsed options (``onemarket.madstart`` parses them as oned gives them)."""
    installation = Installation.detect()
    # replies go to a private copy of stdout; fd 1 becomes stderr, so that nothing printed
    # by a library can corrupt the conversation with oned
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    mad = Mad(options, installation, out_fd)
    log(
        f"started: remotes {installation.remotes}, drivers {','.join(sorted(mad.enabled)) or '-'}"
        f", {options.concurrency} at once, timeout {options.timeout_s or 'none'}"
    )
    code = asyncio.run(mad.run())
    log("finished")
    return code
