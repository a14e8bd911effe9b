"""Atomic, sparse, hashed write of a source into a folder of a remote host, over ssh.

The bytes are streamed into ``dd conv=sparse`` on the host, writing a hidden temporary file
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
from .hashing import Digests
from .interrupt import interruptible
from .local import temp_name
from .sources import Source, file_tail, ssh_argv
from .streamcopy import SPARSE_BLOCK_BYTES, PipeSink, copy_stream

REMOTE_COMMAND_TIMEOUT_S = 120.0
"""Bound on a short remote command (rename, delete, df) and on the wait for the writer to end."""
CLEANUP_TIMEOUT_S = 30.0
"""Bound on removing a remote temporary file after a failure."""
ABORT_GRACE_S = 2.0
"""After a failed copy, how long ssh may take to report the remote side's exit status."""
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
        raise remote_failure(host, proc.returncode, proc.stderr[-MAX_STDERR_BYTES:])
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


def write_remote_atomically(
    host: str,
    folder: str,
    name: str,
    source: Source,
    *,
    expected_md5: str = "",
    progress: Progress | None = None,
) -> Digests:
    """Stream ``source`` into ``host:folder/name``: temporary file, sync, verify, rename."""
    tmp = f"{folder}/{temp_name(name)}"
    final = f"{folder}/{name}"
    script = _WRITE_SCRIPT.format(
        dir=shlex.quote(folder),
        tmp=shlex.quote(tmp),
        block=SPARSE_BLOCK_BYTES,
        no_folder=EXIT_NO_FOLDER,
        failed=EXIT_WRITE_FAILED,
    )
    started = committing = False
    with (
        interruptible(f"import into {host}:{folder}"),
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        try:
            try:
                proc = subprocess.Popen(
                    ssh_argv(host, script), stdin=subprocess.PIPE, stdout=out, stderr=err
                )
            except OSError as exc:
                raise RemoteError(f"cannot run ssh to reach {host}: {exc.strerror}") from None
            started = True
            assert proc.stdin is not None
            try:
                digests = _send(proc, source, progress)
            except BrokenPipeError:
                digests = None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                code = proc.wait(timeout=REMOTE_COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RemoteError(f"bridge host {host} did not finish writing {final}") from None
            if code != 0:
                raise remote_failure(host, code, file_tail(err, MAX_STDERR_BYTES))
            if digests is None:
                raise RemoteError(f"bridge host {host} closed the connection while writing")
            written = file_tail(out, MAX_STDERR_BYTES).decode("ascii", "replace").strip()
            if written != str(digests.size_bytes):
                raise RemoteError(
                    f"bridge host {host} wrote {written or 'an unknown number of'} bytes "
                    f"of {digests.size_bytes} to {final}"
                )
            digests.verify_md5(expected_md5, f"import of {source.description}")
            committing = True
            run_remote(
                host,
                _COMMIT_SCRIPT.format(
                    tmp=shlex.quote(tmp), final=shlex.quote(final), dir=shlex.quote(folder)
                ),
            )
        except BaseException:
            if started:
                _stop(proc)
                # Interrupted while renaming: the name is ours alone, and oned records a failure.
                _cleanup(host, [tmp, final] if committing else [tmp])
            raise
    return digests


def _send(
    proc: subprocess.Popen[bytes],
    source: Source,
    progress: Progress | None,
) -> Digests:
    assert proc.stdin is not None
    sink = PipeSink(proc.stdin.fileno(), on_abort=lambda: _stop(proc, grace_s=ABORT_GRACE_S))
    return copy_stream(source, sink, progress=progress)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 0.0) -> None:
    """End ssh: given ``grace_s`` to exit by itself (its exit status says why), then killed."""
    if grace_s > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=CLEANUP_TIMEOUT_S)
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _cleanup(host: str, paths: list[str]) -> None:
    """Remove what a failed import wrote; a host that cannot be reached gets a WARN line."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    try:
        run_remote(host, f"rm -f -- {quoted}", timeout_s=CLEANUP_TIMEOUT_S)
    except MarketError as exc:
        driverlog.warn(f"{host}:{paths[0]} may be left behind: {exc}")
