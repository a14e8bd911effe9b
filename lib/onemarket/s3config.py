"""A boto3 S3 client built from a marketplace's attributes, and S3 failures as one-line errors.

Shared by the s3 marketplace backend and the s3:// datastore downloader, so both read the same
attributes (section 6 of the protocol notes) the same way:

- ``ACCESS_KEY_ID``, ``SECRET_ACCESS_KEY``, ``REGION`` are required (``BUCKET`` is checked by
  the callers that need it); the key id and the secret are registered with
  :func:`driverlog.redact` before any request is made, so no log line (boto3's debug output
  included) of an action, the downloader, ``one-market`` or a mirror can show them.
- ``ENDPOINT`` names an S3-compatible service (Ceph RGW, MinIO...); without it, AWS.
- ``AWS=no`` (or an ENDPOINT outside amazonaws.com) marks a non-AWS service: request checksums
  and response validation are then only done when an operation requires them, because recent
  boto3 sends CRC32 trailers (aws-chunked bodies) by default, which several S3-compatible
  servers reject.
- ``FORCE_PATH_STYLE=YES|NO``; unset means path style for non-AWS endpoints (they rarely have
  wildcard DNS for virtual-hosted buckets) and botocore's choice for AWS.
- ``SIGNATURE_VERSION`` ``v4`` (default: what AWS requires and every current S3-compatible
  server accepts) or ``s3`` (legacy SigV2, for old gateways).
- Proxies come from the usual environment variables (``https_proxy``, ``no_proxy``), which
  botocore honours; files in ``~/.aws`` never add an endpoint behind the market's back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore import exceptions as bexc
from botocore.config import Config

from . import driverlog
from .action import Market
from .backends.attributes import Attr, flag, read, redact
from .errors import (
    ActionTimeout,
    ChecksumError,
    ConfigError,
    MarketError,
    RemoteError,
    StorageError,
    StorageFullError,
)
from .location import url_parts

CONNECT_TIMEOUT_S = 15.0
"""Time allowed to open a TCP connection to the endpoint."""
READ_TIMEOUT_S = 120.0
"""Longest silence tolerated on an open connection (a part upload waits for the server's
answer after the last byte, and a busy RGW can take a while to commit a large part)."""
MAX_ATTEMPTS = 5
"""Attempts per request (botocore standard retry mode: exponential backoff, retries on
throttling, 5xx and connection errors)."""
MAX_POOL_CONNECTIONS = 16
"""HTTP connections kept per client; must cover the upload worker count (each idle connection
costs a socket and a few KB)."""
USER_AGENT_APPID = "onemarket"

METADATA_MD5 = "md5"
"""Object metadata key (``x-amz-meta-md5``) holding the hex MD5 of the whole object."""
METADATA_SHA256 = "sha256"
"""Object metadata key (``x-amz-meta-sha256``) holding the hex SHA-256 of the whole object."""

METADATA_IMPORTING = "onemarket-importing"
"""Metadata key marking the empty placeholder an import stores to claim its key (deleted, or
replaced by the image, when the import ends)."""


SIGNATURE_VERSIONS = {"v4": "s3v4", "s3v4": "s3v4", "s3": "s3", "v2": "s3"}
_AWS_HOST_RE = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$", re.IGNORECASE)


def _endpoint(text: str) -> str:
    driverlog.redact_url(text)  # a password in it is shown in every message
    parts = url_parts(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, not {text!r}")
    return text.rstrip("/")


def _signature_version(text: str) -> str:
    if text.lower() not in SIGNATURE_VERSIONS:
        raise ValueError(f"must be 's3' or 'v4', not {text.lower()!r}")
    return SIGNATURE_VERSIONS[text.lower()]


def _bucket(text: str) -> str:
    if "/" in text or not (3 <= len(text) <= 255):
        raise ValueError(f"{text!r} is not a valid bucket name")
    return text


ATTRIBUTES = (
    Attr("ACCESS_KEY_ID", "access key id (masked in every message)", required=True, secret=True),
    Attr(
        "SECRET_ACCESS_KEY",
        "secret access key (masked in every message)",
        required=True,
        secret=True,
    ),
    Attr("REGION", "region", required=True),
    Attr("BUCKET", "bucket (created when missing)", required=True, parse=_bucket),
    Attr("ENDPOINT", "URL of an S3-compatible service (default AWS)", parse=_endpoint),
    Attr("AWS", "no: not AWS (default: ENDPOINT is an amazonaws.com host)", parse=flag),
    Attr("FORCE_PATH_STYLE", "path-style addressing (default: yes when not AWS)", parse=flag),
    Attr("SIGNATURE_VERSION", "v4, or s3 (SigV2)", "v4", parse=_signature_version),
)
"""The attributes every s3 client reads (the s3 backend adds its own)."""


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to talk to one S3 service, validated, with the secret registered."""

    market_name: str
    access_key_id: str
    secret_access_key: str
    region: str
    bucket: str
    endpoint: str | None
    aws: bool
    path_style: bool | None
    signature_version: str

    def __repr__(self) -> str:
        return f"S3Settings(market={self.market_name!r}, endpoint={self.where!r})"

    @property
    def where(self) -> str:
        """Human description of the service, for messages."""
        return self.endpoint or f"AWS S3 ({self.region})"

    @classmethod
    def from_market(cls, market: Market, need_bucket: bool = True) -> S3Settings:
        redact(market, ATTRIBUTES)  # before anything can fail and say why
        table = [a if need_bucket or a.name != "BUCKET" else replace(a, required=False)
                 for a in ATTRIBUTES]  # fmt: skip
        v = read(market, table)
        endpoint = v["ENDPOINT"]
        host = (urlsplit(endpoint).hostname or "") if endpoint else ""
        aws = v["AWS"]
        if aws is None:
            aws = endpoint is None or bool(_AWS_HOST_RE.search(host))
        path_style = v["FORCE_PATH_STYLE"]
        if path_style is None and not aws:
            path_style = True
        return cls(
            market_name=market.name,
            access_key_id=v["ACCESS_KEY_ID"],
            secret_access_key=v["SECRET_ACCESS_KEY"],
            region=v["REGION"],
            bucket=v["BUCKET"] or "",
            endpoint=endpoint,
            aws=aws,
            path_style=path_style,
            signature_version=v["SIGNATURE_VERSION"],
        )


def client_config(
    settings: S3Settings,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    read_timeout_s: float = READ_TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
    max_pool_connections: int = MAX_POOL_CONNECTIONS,
    sign_payload: bool | None = None,
) -> Config:
    """The botocore Config for ``settings`` (timeouts and attempts overridable for tests).

    ``sign_payload=False`` sends bodies as UNSIGNED-PAYLOAD even over plain http; only for
    clients whose every body carries a (signed) Content-MD5 header, which the server checks.
    """
    s3_opts: dict[str, object] = {}
    if sign_payload is not None:
        s3_opts["payload_signing_enabled"] = sign_payload
    if settings.path_style is not None:
        s3_opts["addressing_style"] = "path" if settings.path_style else "virtual"
    extra: dict[str, object] = {}
    if not settings.aws:
        extra["request_checksum_calculation"] = "when_required"
        extra["response_checksum_validation"] = "when_required"
    return Config(
        region_name=settings.region,
        signature_version=settings.signature_version,
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        user_agent_appid=USER_AGENT_APPID,
        ignore_configured_endpoint_urls=True,
        tcp_keepalive=True,
        s3=s3_opts or None,
        **extra,
    )


def make_client(
    settings: S3Settings | Market,
    session: boto3.session.Session | None = None,
    **config_overrides: float | int | bool,
) -> Any:
    """A boto3 S3 client for ``settings`` (or straight from a Market).

    A private boto3 Session is used (pass the same one for several clients: each session
    loads its own copy of the S3 service model, about 10 MB), so nothing from the default
    session, the environment's AWS_* credentials or ``~/.aws`` changes which account or
    endpoint is used.
    """
    if isinstance(settings, Market):
        settings = S3Settings.from_market(settings)
    driverlog.redact(settings.secret_access_key)
    session = session or boto3.session.Session()
    try:
        client = session.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=client_config(settings, **config_overrides),  # type: ignore[arg-type]
        )
    except (bexc.BotoCoreError, ValueError) as exc:
        raise ConfigError(
            f"marketplace '{settings.market_name}': cannot configure the S3 client "
            f"({driverlog.scrub(str(exc))})"
        ) from None
    if settings.signature_version == "s3":
        client.meta.events.register("before-sign.s3", _match_v2_auth_path)
    return client


def _match_v2_auth_path(request: Any, **_: Any) -> None:
    """SigV2 signs ``auth_path``; for path-style bucket requests botocore signs ``/bucket/``
    while it sends ``/bucket``, and the server (Ceph RGW) rejects the signature. Sign what is
    sent."""
    auth_path = getattr(request, "auth_path", None)
    url_path = urlsplit(request.url).path
    if auth_path and auth_path == url_path + "/":
        request.auth_path = url_path


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_FULL_CODES = {"QuotaExceeded", "EntityTooLarge", "InsufficientCapacity"}
_CHECKSUM_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "NoSuchUpload", "NotFound", "404"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}


def client_error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ('' otherwise); HEAD answers carry only the status."""
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "")
        return code or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def is_missing(exc: BaseException) -> bool:
    """The answer says the bucket, object or upload does not exist (a HEAD's bare 404
    included): the one test of "not found" for every S3 caller."""
    return client_error_code(exc) in _MISSING_CODES


def is_precondition_failed(exc: BaseException) -> bool:
    """A conditional request (If-None-Match, If-Match) was refused: the condition is false."""
    return client_error_code(exc) in _PRECONDITION_CODES


def _timed_out(exc: BaseException) -> bool:
    """A request body that could not be sent in time surfaces as ConnectionClosedError."""
    if not isinstance(exc, bexc.ConnectionClosedError):
        return False
    cause = exc.kwargs.get("error")
    return isinstance(cause, TimeoutError) or "timed out" in str(cause)


def s3_error(exc: BaseException, what: str, where: str = "") -> MarketError:
    """One line for an administrator saying what failed against S3 and why, secret-free.

    ``what`` names the operation and object (``upload of s3://b/k``), ``where`` the endpoint.
    """
    at = f" at {where}" if where else ""
    if isinstance(exc, MarketError):
        return exc
    if isinstance(exc, bexc.ClientError):
        code = client_error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(exc.response.get("Error", {}).get("Message") or "")
        detail = f"{code}{f' (HTTP {status})' if status and str(status) != code else ''}"
        if message and message != code:
            detail += f": {message}"
        detail = driverlog.scrub(detail)
        if code in _CREDENTIAL_CODES:
            err: MarketError = ConfigError(
                f"{what}: S3{at} rejected the credentials ({detail}); "
                "check ACCESS_KEY_ID and SECRET_ACCESS_KEY"
            )
        elif code in _DENIED_CODES or status == 403:
            err = StorageError(f"{what}: access denied by S3{at} ({detail})")
        elif code in _FULL_CODES:
            err = StorageFullError(f"{what}: S3{at} refused the data ({detail})")
        elif code in _CHECKSUM_CODES:
            err = ChecksumError(f"{what}: S3{at} received corrupted data ({detail})")
        elif code in _MISSING_CODES or status == 404:
            err = StorageError(f"{what}: not found on S3{at} ({detail})")
        else:
            err = RemoteError(f"{what}: S3{at} failed ({detail})")
        return err
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return ConfigError(f"{what}: no S3 credentials (ACCESS_KEY_ID, SECRET_ACCESS_KEY)")
    if isinstance(exc, bexc.ParamValidationError):
        return ConfigError(f"{what}: invalid S3 request ({driverlog.scrub(str(exc))})")
    if isinstance(exc, bexc.ReadTimeoutError | bexc.ConnectTimeoutError) or _timed_out(exc):
        return ActionTimeout(f"{what}: S3{at} did not answer in time ({type(exc).__name__})")
    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectionClosedError):
        return RemoteError(f"{what}: cannot reach S3{at} ({type(exc).__name__})")
    if isinstance(exc, bexc.BotoCoreError):
        return RemoteError(f"{what}: S3{at} failed ({driverlog.scrub(str(exc))})")
    if isinstance(exc, OSError):
        return RemoteError(f"{what}: S3{at} failed ({exc.strerror or type(exc).__name__})")
    return RemoteError(f"{what}: S3{at} failed ({type(exc).__name__})")
