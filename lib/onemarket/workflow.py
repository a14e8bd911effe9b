"""What IMPORT and DELETE mean before a market driver runs, as the stock MAD defines it
(``src/market_mad/one_market.rb``): one place for the MAD and the action runner.

- DELETE of a VM or service template app (TYPE 2 or 3) stores nothing and runs no driver: it
  succeeds at once, whatever the driver (one_market.rb ``delete``, the ``[2, 3]`` test).
- IMPORT of an image app is two steps: the datastore's ``export`` (DS_DRIVER_ACTION_DATA on
  stdin, the app id as argument) prints ``<IMPORT_INFO>``, then the market's ``import`` runs
  with those values added (one_market.rb ``import``). Other app types are not imported.

The two steps can overlap: the ``fs`` export names the image's own SOURCE as IMPORT_SOURCE
when the datastore has no BRIDGE_LIST (one-6.10, one-7.4 and master
src/datastore_mad/remotes/fs/export:52,77,89) and spends its time on ``md5sum``; our import can
copy that file meanwhile and hold it unpublished until the export's answer. The MAD hands the
answer over only when the export named the same SOURCE (and nothing to dispose of); otherwise
the copy is discarded and the import runs after the export, as it always does for others.
"""

from __future__ import annotations

import json
import os
import re
import select
from dataclasses import dataclass, replace
from pathlib import Path

from .action import APP_TYPE_IMAGE, ActionData, ImportInfo
from .errors import MarketError, NotSupportedError, PayloadError, one_line
from .transfer.sources import read_pipe

SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
"""A driver or datastore name that is also a safe single path component."""


def runs_nothing(action: str, data: ActionData) -> bool:
    """True for a DELETE of a template app: answered SUCCESS without running a driver."""
    return action.upper() == "DELETE" and data.app is not None and data.app.type != APP_TYPE_IMAGE


@dataclass(frozen=True)
class ExportStep:
    """The first step of an IMPORT: the datastore's export and what it reads on stdin."""

    program: Path
    payload: bytes
    """Base64 of ``<DS_DRIVER_ACTION_DATA>`` (IMAGE and DATASTORE as oned sent them)."""
    label: str


def export_step(data: ActionData, datastore_remotes: Path) -> ExportStep:
    """The export to run for an IMPORT, or a MarketError saying why there is none."""
    if data.app is None:
        raise PayloadError("IMPORT action data has no MARKETPLACEAPP")
    if data.app.type != APP_TYPE_IMAGE:
        raise NotSupportedError(
            f"apps of type {data.app.type} are not imported by drivers, only images"
        )
    ds_mad = data.datastore.ds_mad if data.datastore is not None else ""
    if not ds_mad:
        raise PayloadError("IMPORT action data has no DATASTORE/DS_MAD")
    program = datastore_remotes / ds_mad / "export"
    if not SAFE_NAME_RE.fullmatch(ds_mad) or not program.is_file():
        raise NotSupportedError(f"Datastore driver '{one_line(ds_mad, 64)}' not available")
    return ExportStep(program, data.ds_export_payload(), f"datastore {ds_mad} export")


def with_export_result(data: ActionData, export_stdout: bytes) -> ActionData:
    """The action data of the second step: the export's IMPORT_INFO added."""
    return replace(data, import_info=ImportInfo.from_export_output(export_stdout))


MD5_RE = re.compile(r"[0-9a-f]{32}")
MAX_ANSWER_BYTES = select.PIPE_BUF
"""Largest export answer handed to an overlapped import (MD5, SIZE, FORMAT: a few dozen bytes);
written at once into an empty pipe, so the MAD's write never waits for the child."""


class ExportDeclined(MarketError):
    """The export did not confirm the copy's source: the overlapped copy is discarded."""


def overlap_guess(data: ActionData) -> ImportInfo | None:
    """The IMPORT_SOURCE the export will print when it is the image's own file, known before
    the export runs: an absolute SOURCE on a datastore without BRIDGE_LIST."""
    image, datastore = data.image, data.datastore
    if image is None or datastore is None or datastore.attrs.get("BRIDGE_LIST", "").strip():
        return None
    if not os.path.isabs(image.source):
        return None
    # not stat()ed here: the MAD's loop must not wait for a hung NFS mount; a guess that
    # cannot be read fails in the copy's own process, and the export decides what counts
    return ImportInfo(source=image.source, size_mb=image.size_mb, format=image.format)


@dataclass(frozen=True)
class Confirmation:
    """The export's verdict on the guess: the answer the overlapped import publishes on, or
    why its copy is discarded (for the MAD's log)."""

    answer: bytes = b""
    declined: str = ""


def confirms(guess: ImportInfo, exported: ImportInfo) -> Confirmation:
    """What the MAD sends the overlapped import when the export agrees with its guess. A
    DISPOSE=YES export made a copy to import instead: the guess was not it; an export with no
    MD5 gives nothing to publish the copy on."""
    if exported.source != guess.source:
        return Confirmation(declined="the export named another source")
    if exported.dispose or exported.dispose_cmd:
        return Confirmation(declined="the export made a copy to import (DISPOSE)")
    if not MD5_RE.fullmatch(exported.md5):
        return Confirmation(declined="the export gave no MD5 to check the copy against")
    answer = {"md5": exported.md5, "size_mb": exported.size_mb, "format": exported.format}
    encoded = json.dumps(answer).encode()
    if len(encoded) > MAX_ANSWER_BYTES:
        return Confirmation(declined="the export's answer is longer than one pipe write")
    return Confirmation(answer=encoded)


class ExportAnswer:
    """The overlapped import's side: the export's values, read from ``fd`` when first asked
    (the copy is complete by then), blocking until the MAD writes them or closes the pipe."""

    def __init__(self, fd: int, guess: ImportInfo) -> None:
        self._fd = fd
        self._guess = guess
        self._answer: ImportInfo | ExportDeclined | None = None

    def __call__(self) -> ImportInfo:
        if self._answer is None:
            try:
                self._answer = self._read()
            except ExportDeclined as exc:
                self._answer = exc  # the fd is closed: never read again
        if isinstance(self._answer, ExportDeclined):
            raise self._answer
        return self._answer

    def _read(self) -> ImportInfo:
        # the MAD writes at most MAX_ANSWER_BYTES, then closes (more is cut, and fails to
        # parse); read_pipe, so that a stop signal is not held up by the wait for the export
        text = read_pipe(self._fd, MAX_ANSWER_BYTES + 1)
        os.close(self._fd)
        try:
            answer = json.loads(text) if text else None
            if answer is None:
                raise ExportDeclined("the datastore export did not confirm the image's SOURCE")
            return replace(
                self._guess,
                md5=str(answer["md5"]),
                size_mb=int(answer["size_mb"]),
                format=str(answer["format"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportDeclined(f"unreadable answer of the datastore export: {exc}") from None
