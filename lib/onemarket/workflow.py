"""What IMPORT and DELETE mean before a market driver runs, as the stock MAD defines it
(``src/market_mad/one_market.rb``): one place for the MAD and the action runner.

- DELETE of a VM or service template app (TYPE 2 or 3) stores nothing and runs no driver: it
  succeeds at once, whatever the driver (one_market.rb ``delete``, the ``[2, 3]`` test).
- IMPORT of an image app is two steps: the datastore's ``export`` (DS_DRIVER_ACTION_DATA on
  stdin, the app id as argument) prints ``<IMPORT_INFO>``, then the market's ``import`` runs
  with those values added (one_market.rb ``import``). Other app types are not imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from .action import APP_TYPE_IMAGE, ActionData, ImportInfo
from .errors import NotSupportedError, PayloadError, one_line

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
