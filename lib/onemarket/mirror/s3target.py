"""``--to-market <s3 marketplace>``: the mirror tree uploaded under a key prefix of its bucket.

The tree is built as for a folder, in a local working copy (verified, incremental, atomic:
store.py), then copied to ``<bucket>/<sub-path>/`` with the s3 backend's own verified upload
(``S3Backend.put_file``: signed payloads, the MD5 read checked against the server's ETag):

1. the files whose identity (size and checksums, from the working copy's manifest) differs
   from what the bucket's state object records: new and changed files only;
2. then the catalog objects, so a catalog never names a file not uploaded yet;
3. then the state object (``<sub-path>/.onemarket-mirror/uploaded.json``).

A PUT replaces an object only once it is complete, so a reader sees the previous or the new
file, never a part, and a run stopped midway leaves the previous catalog with every file it
names still there (the state records the files it stored, so the next run skips them). Unlike
the folder's renames there is no single switch: a changed file kept at the same path (a
``one`` appliance's ``download/0``) is new a few seconds before its catalog.
``--prune`` deletes, after the catalogs, the objects the state names and the tree no longer has.
The bucket must exist (the s3 marketplace creates it on its first import).

No web-server rule is possible on S3, so the catalog answers are stored as objects of their
own: ``appliance`` (what ``GET <ENDPOINT>/appliance`` reads) beside ``appliance.json``; and the
stock drivers join ``<ENDPOINT>`` (which ends with '/') and ``/appliance`` or
``/streams/v1/images.json`` into a path with ``//`` (one-7.0:src/market_mad/remotes/one/
monitor:67,93,168; linuxcontainers/monitor:94,127), which nginx merges but S3 reads as another
key: those keys are stored too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..action import Market
from ..backends.base import Context
from ..backends.s3 import S3Backend
from ..errors import MarketError, from_os_error
from ..installation import Installation
from ..s3config import is_missing, s3_error
from . import one
from .store import LocalStore

STATE_KEY = ".onemarket-mirror/uploaded.json"
"""Below the sub-path: what the bucket holds, path -> identity (files) or MD5 (catalogs)."""
STATE_FORMAT = 1
CATALOG_ANSWERS = {one.CATALOG_FILE: ("appliance",)}
"""Catalog files that a web server answers under another name (the README's rule)."""


@dataclass
class Uploaded:
    """What one upload did (the ``upload`` part of ``--json``)."""

    url: str
    files: int = 0
    catalogs: int = 0
    unchanged: int = 0
    deleted: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "files": self.files,
            "catalogs": self.catalogs,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "bytes": self.bytes,
        }


def catalog_keys(name: str) -> list[str]:
    """Paths below the sub-path a catalog file is stored at: its own, the name a web server
    would answer it under, and each with the stock drivers' leading '/' (``//`` after the
    sub-path)."""
    names = [name, *CATALOG_ANSWERS.get(name, ())]
    return names + ["/" + n for n in names]


class S3Target:
    """The bucket and key prefix of an s3 marketplace receiving a mirror tree."""

    def __init__(
        self, market: Market, installation: Installation, sub_path: str, url: str = ""
    ) -> None:
        self.backend = S3Backend(market, Context(installation))
        self.market = market
        self.sub_path = sub_path.strip("/")
        self.url = url or self.public_url()

    def public_url(self) -> str:
        """Where the prefix is read over plain HTTP (the ENDPOINT of the mirror marketplace):
        path style on an S3-compatible endpoint, virtual-hosted on AWS."""
        settings = self.backend.settings
        bucket = settings.bucket
        if settings.endpoint and settings.path_style is not False:
            return f"{settings.endpoint.rstrip('/')}/{bucket}/{self.sub_path}/"
        if settings.endpoint:
            parts = urlsplit(settings.endpoint)
            return f"{parts.scheme}://{bucket}.{parts.netloc}/{self.sub_path}/"
        return f"https://{bucket}.s3.{settings.region}.amazonaws.com/{self.sub_path}/"

    def key(self, path: str) -> str:
        return f"{self.sub_path}/{path}"

    @property
    def where(self) -> str:
        return f"s3://{self.backend.bucket}/{self.sub_path}/"

    # ----------------------------------------------------------------------- state

    def read_state(self) -> dict[str, str]:
        try:
            answer = self.backend.client.get_object(
                Bucket=self.backend.bucket, Key=self.key(STATE_KEY)
            )
            doc = json.loads(answer["Body"].read())
            files = doc["files"] if doc.get("format") == STATE_FORMAT else {}
            return {str(k): str(v) for k, v in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}  # unreadable: everything is uploaded again
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            if is_missing(exc):
                return {}
            raise self._error(exc, f"reading {self.where}{STATE_KEY}") from None

    def _error(self, exc: BaseException, what: str) -> MarketError:
        return s3_error(exc, what, self.backend.settings.where)

    # ----------------------------------------------------------------------- the upload

    def upload(self, store: LocalStore, catalog_names: Iterable[str], prune: bool) -> Uploaded:
        """Make the prefix hold the published tree of ``store`` (files, catalogs, state).

        A run that fails or is stopped midway still records what it stored (best effort), so
        that the next run does not send those files again."""
        out = Uploaded(self.url)
        state = self.read_state()
        new_state: dict[str, str] = {}
        sent: dict[str, str] = {}  # stored by this run, path -> identity
        try:
            for path, identity in sorted(store.manifest.items()):
                local = store.final_path(path)
                if not local.is_file():
                    continue
                new_state[path] = identity
                if state.get(path) == identity:
                    out.unchanged += 1
                    continue
                self.backend.put_file(self.key(path), str(local))
                sent[path] = identity
                out.files += 1
                out.bytes += local.stat().st_size
            with tempfile.TemporaryDirectory(prefix="onemarket-mirror-") as tmp:
                for name, body in store.read_catalogs(catalog_names).items():
                    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
                    keys = catalog_keys(name)
                    for path in keys:
                        new_state[path] = f"md5={md5}"
                    if all(state.get(path) == new_state[path] for path in keys):
                        continue
                    staged = Path(tmp) / "catalog"
                    staged.write_bytes(body)
                    for path in keys:
                        self.backend.put_file(self.key(path), str(staged), md5)
                        sent[path] = new_state[path]
                    out.catalogs += 1
                    out.bytes += len(body)
        except BaseException:
            if sent:
                with contextlib.suppress(Exception):
                    self._save_state({**state, **sent})
            raise
        if prune:
            for path in sorted(set(state) - set(new_state)):
                self._delete(path)
                out.deleted += 1
        else:  # what is not deleted stays recorded, for a later --prune
            new_state = {**{p: v for p, v in state.items() if p not in new_state}, **new_state}
        if new_state != state:
            self._save_state(new_state)
        return out

    def _delete(self, path: str) -> None:
        key = self.key(path)
        try:
            self.backend.client.delete_object(Bucket=self.backend.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            if not is_missing(exc):
                raise self._error(exc, f"deletion of {self.where}{path}") from None

    def _save_state(self, state: dict[str, str]) -> None:
        data = json.dumps({"format": STATE_FORMAT, "files": state}, indent=0).encode()
        with tempfile.NamedTemporaryFile(prefix="onemarket-mirror-state-") as f:
            f.write(data)
            f.flush()
            self.backend.put_file(self.key(STATE_KEY), f.name)


def working_copy(installation: Installation, target: S3Target) -> Path:
    """The local tree an s3 mirror is built in (kept: it makes the next run incremental)."""
    settings = target.backend.settings
    host = urlsplit(settings.endpoint).netloc if settings.endpoint else "aws"
    name = f"{host}-{settings.bucket}-{target.sub_path}".replace("/", "_").replace(":", "_")
    folder = installation.cache_dir / "mirror" / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise from_os_error(exc, f"cannot create the mirror's working copy {folder}") from None
    return folder
