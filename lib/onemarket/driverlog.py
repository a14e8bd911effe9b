"""Log lines of an action: ``INFO:``, ``WARN:``, ``ERROR:``, ``DEBUG:`` on stderr.

The MAD turns these lines into oned ``LOG`` messages while the action runs, so each line is
flushed at once. Stdout is reserved for the action's result. Every message is exactly one
line, whatever its origin: control characters (newlines included) are written as escapes
(:func:`escape_controls`), so text from a catalog or a server can never start a line of its
own (``LOG E ...`` forged from a key with a newline). Secrets registered with
:func:`redact` and the password of any ``scheme://user:password@`` URL are masked in every
line (:func:`scrub`), and the standard ``logging`` module (boto3, urllib3) is routed here at
WARNING level so that no library writes to stdout.

This module imports nothing of the package: ``errors.one_line`` uses :func:`scrub` and
:data:`CONTROL_RE`, so every exception message is masked by the same rule as a log line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
from typing import TextIO
from urllib.parse import urlsplit

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
"""Registered secrets, longest first; replaced (never mutated) so readers need no lock."""
_debug = False
stream: TextIO | None = None
"""Where lines go; ``None`` means the current ``sys.stderr`` (looked up at each write)."""


def redact(secret: str | None) -> None:
    """Mask ``secret`` in every line written from now on, also as ``repr()`` and JSON show it
    (a backslash doubled, a quote escaped), since messages quote values with ``!r``."""
    global _secrets
    if secret and len(secret) >= 4:
        forms = {secret, repr(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
        with _lock:
            if not forms <= set(_secrets):
                _secrets = tuple(sorted({*_secrets, *forms}, key=len, reverse=True))


def redact_url(url: str) -> None:
    """Mask the password of a ``scheme://user:password@host`` URL in every line from now on."""
    try:
        password = urlsplit(url.strip()).password
    except ValueError:
        return
    redact(password)


URL_PASSWORD_RE = re.compile(r"(?<![A-Za-z0-9+.-])(?P<keep>[A-Za-z0-9+.-]+://[^\s/?#:]*:)[^\s/]*@")
"""The password of a ``scheme://user:password@`` URL: everything from the first ``:`` after
the user (which may hold an ``@``: an e-mail login) to the last ``@`` before a ``/`` or a
blank, whatever it holds (backslashes, quotes, ``:``, ``@``, ``%``); an unencoded ``/`` or
blank would end the URL's authority anyway. A port (``http://host:8080/x``) or
``ssh://host:/path`` has no ``@`` there and is left alone, and so is a bare
``scheme://name@`` (RFC 3986's user name: ``ssh://root@host`` must stay readable). The scheme
is matched from the start of its run of scheme characters only, so a long run of them
(base64 in a line) is scanned once, not once per character."""


def mask_url_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL written ``****``."""
    if "://" not in text:
        return text
    return URL_PASSWORD_RE.sub(lambda m: m.group("keep") + "****@", text)


def scrub(text: str) -> str:
    """``text`` safe to show: every registered secret masked (longest first, so none leaks
    partly), then every URL password (:data:`URL_PASSWORD_RE`). The one masking rule of
    the package: log lines, ``errors.one_line`` (every exception message, before it is cut)
    and the CLI's output all go through it."""
    for secret in _secrets:
        text = text.replace(secret, "****")
    return mask_url_passwords(text)


DEBUG_ENV = "ONE_MARKET_DEBUG"


def debug_from_env() -> bool:
    """Whether ``ONE_MARKET_DEBUG`` asks for DEBUG lines (set, and not 0/no/false/off)."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return value not in ("", "0", "no", "false", "off")


def set_debug(enabled: bool) -> None:
    global _debug
    _debug = enabled


CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters that must not reach a line as they are: C0 and C1 controls (U+009B is a CSI a
terminal obeys, U+0085 a line break to some readers), DEL, and the Unicode line and paragraph
separators. Log lines escape them (:func:`escape_controls`), ``errors.one_line`` blanks them."""
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED_ESCAPES.get(ch) or (
        f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    )


def escape_controls(text: str) -> str:
    """``text`` as one line: C0/C1 controls, DEL and U+2028/U+2029 written as ``\\n``,
    ``\\r``, ``\\t``, ``\\xNN`` or ``\\uNNNN``."""
    return CONTROL_RE.sub(_escape, text)


def _write(prefix: str, message: str) -> None:
    line = escape_controls(scrub(str(message)).strip())
    if not line:
        return
    out = stream if stream is not None else sys.stderr
    with _lock:
        out.write(f"{prefix}: {line}\n")
        out.flush()


def info(message: str) -> None:
    _write("INFO", message)


def warn(message: str) -> None:
    _write("WARN", message)


def error(message: str) -> None:
    _write("ERROR", message)


def debug(message: str) -> None:
    if _debug:
        _write("DEBUG", message)


class ScrubbingStream(io.TextIOBase):
    """A text stream that masks registered secrets before writing to ``target``.

    Text is passed on a line at a time (a secret printed in several ``write`` calls is still
    masked); :meth:`flush` passes on what is left. It covers Python-level writes only: bytes a
    child process writes to the file descriptor cannot be seen here.
    """

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            done, _, self._pending = self._pending.rpartition("\n")
            self._target.write(scrub(done + "\n"))
            self._target.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._target.write(scrub(self._pending))
            self._pending = ""
        self._target.flush()

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self) -> object:
        """The target's byte stream, for libraries that write bytes (those are not masked)."""
        return self._target.buffer  # type: ignore[attr-defined]

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


CREDENTIAL_PATTERNS = (
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*b?['\"]?)[^'\",}\n]+"),
    re.compile(r"(?i)((?:credential|signature|x-amz-signature|x-amz-credential)=)[^,&\s'\"]+"),
    re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\",}\n]+"),
    re.compile(r"(?im)^(signature:\s*)\S+"),
)
"""Where a request signature or key id shows in a library's debug line (headers, the query
of a presigned URL, botocore's "Signature:" line)."""


def mask_credentials(text: str) -> str:
    """``text`` with request signatures, Authorization headers and session tokens masked."""
    for pattern in CREDENTIAL_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "****", text)
    return text


class _Handler(logging.Handler):
    """Library records as our lines: secrets and request signatures masked, so that
    ``ONE_MARKET_DEBUG`` never puts an Authorization header into oned.log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = f"{record.name}: {mask_credentials(record.getMessage())}"
        except Exception:  # noqa: BLE001 - a log record must never break an action
            return
        if record.levelno >= logging.ERROR:
            error(msg)
        elif record.levelno >= logging.WARNING:
            warn(msg)
        else:
            debug(msg)


def route_std_logging() -> None:
    """Send ``logging`` records (of any library) to stderr lines, never to stdout."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Handler())
    root.setLevel(logging.DEBUG if _debug else logging.WARNING)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if _debug else logging.WARNING)
