"""SOURCE values, one parser per scheme (as glance_store's ``StoreLocation.parse_uri``).

A SOURCE is what an import printed and oned stores: ``<BASE_URL>/<file>`` for the http
marketplace, ``s3://<BUCKET>/<KEY>`` for the s3 one. Delete, ``one-market rm`` and the s3://
downloader read it back here, so what one writes the others read the same way.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import SplitResult, unquote, urlsplit

from .errors import ConfigError, MarketError, UnsafePathError, one_line

S3_SCHEME = "s3://"
_SAFE_COMPONENT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+~")
_APP_ID_RE = re.compile(r"^(?:app|marketapp)-(\d{1,18})(?:-|$)")
"""Our http file names (``app-<id>-<hex>``) and s3 keys (stock's ``marketapp-<id>``)."""


def app_id_from_source(source: str) -> int:
    """The app id our drivers put in a SOURCE's last component, or -1 (with BRIDGE_LIST the
    id picks the host holding the file)."""
    m = _APP_ID_RE.match(source.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def url_problem(url: str) -> str | None:
    """Why urllib cannot split ``url`` (from outside: an attribute, IMPORT_SOURCE), or None.

    urllib raises ValueError for an unclosed ``[``, a bad port or a host NFKC would change,
    at the split or later at ``.port``; the reason given here never quotes the URL nor
    urllib's text (both may carry the ``user:password@`` part).
    """
    try:
        _ = urlsplit(url).port
    except ValueError as exc:
        text = str(exc)
        if "IPv6" in text:
            return "unbalanced '[' or ']' around an IPv6 address"
        if "NFKC" in text:
            return "its host holds characters that NFKC normalization changes"
        if "Port" in text or "digits" in text:
            return "its port is not a number from 0 to 65535"
        return "malformed"
    return None


def url_parts(url: str) -> SplitResult:
    """``urlsplit`` of a URL from outside, or ValueError ``is not a valid URL (<reason>)``
    (:func:`url_problem`): what an attribute's parser raises, named by ``attributes.read``."""
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(f"is not a valid URL ({problem})")
    return urlsplit(url)


def split_url(url: str, what: str, error: type[MarketError] = ConfigError) -> SplitResult:
    """:func:`url_parts`, or one ``error`` line: ``<what> is not a valid URL (<reason>)``."""
    try:
        return url_parts(url)
    except ValueError as exc:
        raise error(f"{what} {exc}") from None


@dataclass(frozen=True)
class S3Location:
    """``s3://BUCKET/KEY``."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, source: str) -> S3Location:
        """The bucket and (percent-decoded) key; the key may contain ``/`` (the stock
        downloader's basename rule only covers keys without one, which is all we write)."""
        if source[: len(S3_SCHEME)].lower() != S3_SCHEME:
            raise UnsafePathError(f"SOURCE {one_line(source, 200)!r} is not an s3:// URL")
        bucket, _, key = source[len(S3_SCHEME) :].partition("/")
        key = unquote(key) if "%" in key else key
        if not bucket or not key or "\0" in key:
            raise UnsafePathError(f"{source[:200]!r} is not an s3://BUCKET/KEY source")
        return cls(bucket, key)


@dataclass(frozen=True)
class HttpLocation:
    """``<BASE_URL>/<path>``: a file of the http marketplace's PUBLIC_DIR."""

    base_url: str
    path: PurePosixPath

    @staticmethod
    def new_name(app_id: int) -> str:
        """A flat, unique name: the app id for humans, 128 random bits against collisions."""
        return f"app-{max(app_id, 0)}-{secrets.token_hex(16)}"

    @classmethod
    def parse(cls, source: str, base_url: str) -> HttpLocation:
        """The path of ``source`` below ``base_url``, refusing anything that could leave it."""
        what = f"SOURCE {one_line(source, 200)!r}"  # masked before the cut
        base = base_url.rstrip("/") + "/"
        if not source.startswith(base):
            raise UnsafePathError(f"{what} is not under BASE_URL {base_url!r}")
        raw = source[len(base) :]
        if any(c in raw for c in "?#"):
            raise UnsafePathError(f"{what} carries a query or fragment")
        try:
            decoded = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise UnsafePathError(f"{what} is not valid UTF-8") from None
        if "%" in decoded:
            raise UnsafePathError(f"{what} is percent-encoded more than once")
        if not decoded or decoded.startswith("/") or "\\" in decoded or "\0" in decoded:
            raise UnsafePathError(f"{what} does not name a file under BASE_URL")
        parts = decoded.split("/")
        for part in parts:
            if part in ("", ".", ".."):
                raise UnsafePathError(f"{what} names a path that would leave PUBLIC_DIR")
            if not set(part) <= _SAFE_COMPONENT:
                raise UnsafePathError(f"{what} holds characters outside [A-Za-z0-9._+~-]: refused")
        return cls(base_url, PurePosixPath(*parts))
