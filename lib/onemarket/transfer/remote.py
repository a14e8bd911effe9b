"""Atomic, sparse, hashed write of a source into a folder of a remote host, over ssh.

:class:`RemoteAtomicFile` is the sink (the :class:`sinks.Sink` protocol, as the local
:class:`local.AtomicFile`); :func:`write_remote_atomically` copies, verifies and commits. The
bytes are streamed into ``dd conv=sparse`` on the host, writing a hidden temporary file
(all-zero blocks become holes there). The host reports the size it wrote; only when that size
and the MD5 computed here are right does a second ssh command rename the file to its public
name. A stream that ends early (link cut, this process killed) therefore never publishes
anything, and every failure removes the remote temporary file.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import tempfile

from .. import driverlog
from ..errors import MarketError, RemoteError, StorageError, StorageFullError, one_line
from ..progress import Progress
from .hashing import Digests, Expected
from .interrupt import interruptible
from .local import temp_name
from .sources import Source, file_tail, ssh_argv, tail_lines
from .streamcopy import SPARSE_BLOCK_BYTES, PipeSink, copy_stream

REMOTE_COMMAND_TIMEOUT_S = 120.0
"""Bound on a short remote command (rename, delete, df) and on the wait for the writer to end."""
CLEANUP_TIMEOUT_S = 30.0
"""Bound on removing a remote temporary file after a failure."""
SSH_FAILED = 255
EXIT_NO_FOLDER = 3
EXIT_WRITE_FAILED = 4
MAX_STDERR_BYTES = 64 * 1024
"""Most of a remote command's error output kept for the message (bounds memory)."""

_WRITE_SCRIPT = """umask 022
d={dir}; t={tmp}
[ -d "$d" ] || {{ echo "folder $d does not exist" >&2; exit {no_folder}; }}
trap 'rm -f -- "$t"; exit 1' HUP INT TERM PIPE
dd of="$t" bs={block} iflag=fullblock conv=sparse status=none || {{ rm -f -- "$t"; exit {failed}; }}
sync -- "$t" 2>/dev/null || sync
stat -c %s -- "$t"
"""

_COMMIT_SCRIPT = """t={tmp}; f={final}
chmod 644 -- "$t" && mv -f -- "$t" "$f" && {{ sync -- {dir} 2>/dev/null || true; }}
"""


def run_remote(host: str, script: str, timeout_s: float = REMOTE_COMMAND_TIMEOUT_S) -> str:
    """Run a short shell script on ``host``; its stdout, or RemoteError/StorageError."""
    try:
        proc = subprocess.run(
            ssh_argv(host, script),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RemoteError(
            f"command on bridge host {host} timed out after {timeout_s:.0f} s"
        ) from None
    except OSError as exc:
        raise RemoteError(f"cannot run ssh to reach bridge host {host}: {exc.strerror}") from None
    if proc.returncode != 0:
        raise remote_failure(host, proc.returncode, tail_lines(proc.stderr, MAX_STDERR_BYTES))
    return proc.stdout.decode("utf-8", "replace")


def remote_failure(host: str, code: int, stderr: bytes) -> MarketError:
    """An error for a failed remote command, from its exit status and error output.

    The error carries the status as ``exit_code`` so callers can map their own codes.
    """
    error = _remote_failure(host, code, one_line(stderr.decode("utf-8", "replace"), 300))
    error.exit_code = code  # type: ignore[attr-defined]
    return error


def _remote_failure(host: str, code: int, text: str) -> MarketError:
    if code == SSH_FAILED:
        return RemoteError(f"ssh to bridge host {host} failed: {text or 'connection lost'}")
    if code < 0:
        return RemoteError(f"ssh to bridge host {host} was stopped by signal {-code}")
    if "No space left" in text or "Disk quota exceeded" in text:
        return StorageFullError(f"bridge host {host}: storage full ({text})")
    return StorageError(f"bridge host {host}: {text or f'command exited with status {code}'}")


class RemoteAtomicFile(PipeSink):
    """The ssh twin of :class:`local.AtomicFile`, a sink (``write``/``skip``, ``commit``,
    ``abort``) for ``host:folder/name``: the bytes go through ssh into ``dd conv=sparse``
    writing a hidden temporary name; :meth:`finish` ends the stream and checks the size the
    host wrote, :meth:`commit` renames. A broken pipe raises the host's own reason (storage
    full, ssh lost); :meth:`abort` ends ssh and removes what was written (idempotent)."""

    def __init__(self, host: str, folder: str, name: str) -> None:
        self.host, self.folder = host, folder
        self.tmp, self.final = f"{folder}/{temp_name(name)}", f"{folder}/{name}"
        script = _WRITE_SCRIPT.format(
            dir=shlex.quote(folder),
            tmp=shlex.quote(self.tmp),
            block=SPARSE_BLOCK_BYTES,
            no_folder=EXIT_NO_FOLDER,
            failed=EXIT_WRITE_FAILED,
        )
        self._state = "open"  # then "finished", "committing", "renamed" or "gone"
        self.size_bytes = 0
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish/abort
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish/abort
        try:
            self._proc = subprocess.Popen(
                ssh_argv(host, script), stdin=subprocess.PIPE, stdout=self._out, stderr=self._err
            )
        except OSError as exc:
            self._close_files()
            raise RemoteError(f"cannot run ssh to reach {host}: {exc.strerror}") from None
        assert self._proc.stdin is not None
        super().__init__(self._proc.stdin.fileno())

    def write(self, data: bytes | memoryview) -> None:
        """Send ``data`` (a hole is sent as zeros: ``skip`` writes them here)."""
        try:
            super().write(data)
        except BrokenPipeError:
            self._wait_writer()  # raises the host's reason
            raise RemoteError(
                f"bridge host {self.host} closed the connection while writing"
            ) from None
        self.size_bytes += len(data)

    def finish(self) -> None:
        """End the stream; fail unless the host wrote and synced every byte."""
        if self._state != "open":
            return
        self._wait_writer()
        written = file_tail(self._out, MAX_STDERR_BYTES).decode("ascii", "replace").strip()
        self._state = "finished"
        self._close_files()
        if written != str(self.size_bytes):
            raise RemoteError(
                f"bridge host {self.host} wrote {written or 'an unknown number of'} bytes "
                f"of {self.size_bytes} to {self.final}"
            )

    def commit(self) -> None:
        self.finish()
        self._state = "committing"
        run_remote(
            self.host,
            _COMMIT_SCRIPT.format(
                tmp=shlex.quote(self.tmp),
                final=shlex.quote(self.final),
                dir=shlex.quote(self.folder),
            ),
        )
        self._state = "renamed"

    def abort(self) -> None:
        state, self._state = self._state, "gone"
        if state == "gone":
            return
        if self._proc.poll() is None:
            self._proc.kill()  # also unblocks a write stuck on a stalled link
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=CLEANUP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        self._close_files()
        # interrupted while renaming: the name is ours alone, and oned records a failure
        paths = {"committing": [self.tmp, self.final], "renamed": [self.final]}.get(
            state, [self.tmp]
        )
        try:
            run_remote(self.host, f"rm -f -- {shlex.join(paths)}", timeout_s=CLEANUP_TIMEOUT_S)
        except MarketError as exc:
            driverlog.warn(f"{self.host}:{paths[0]} may be left behind: {exc}")

    def _wait_writer(self) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout=REMOTE_COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RemoteError(
                f"bridge host {self.host} did not finish writing {self.final}"
            ) from None
        if code != 0:
            raise remote_failure(self.host, code, file_tail(self._err, MAX_STDERR_BYTES))

    def _close_files(self) -> None:
        self._out.close()
        self._err.close()


def write_remote_atomically(
    host: str,
    folder: str,
    name: str,
    source: Source,
    *,
    expected_md5: Expected = "",
    progress: Progress | None = None,
) -> Digests:
    """Stream ``source`` into ``host:folder/name``: temporary file, sync, verify, rename;
    nothing is left on any failure or stop signal."""
    with interruptible(f"import into {host}:{folder}"):
        out = RemoteAtomicFile(host, folder, name)
        try:
            digests = copy_stream(source, out, progress=progress)
            out.finish()
            digests.verify_md5(expected_md5, f"import of {source.description}")
            out.commit()
        except BaseException:
            out.abort()
            raise
    return digests
