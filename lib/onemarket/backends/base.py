"""The one interface every driver implements, and the typed results that flow out of it."""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..action import App, ImportInfo, Market
from ..errors import NotSupportedError
from ..installation import Installation
from ..progress import ProgressCallback
from ..template import write_template
from ..transfer.hashing import Expected
from ..units import size_mb
from .attributes import Attr


@dataclass(frozen=True)
class Context:
    """What an action needs from its surroundings, besides the market itself."""

    installation: Installation
    progress: ProgressCallback | None = None


@dataclass(frozen=True)
class Check:
    """One line of ``one-market check``: what was tried, whether it worked, and why."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ImportRequest:
    app: App
    source: ImportInfo
    confirm: Callable[[], ImportInfo] | None = None
    """Set when the copy runs beside the datastore export (the MAD's overlapped import):
    ``source`` is then a guess with no MD5, and this returns the export's values once the
    bytes are read, or raises when the export did not confirm the guess."""

    @property
    def expected_md5(self) -> Expected:
        """The MD5 to check the bytes read against, asked for after the last one."""
        confirm = self.confirm
        return self.source.md5 if confirm is None else lambda: confirm().md5

    def exported(self) -> ImportInfo:
        """The export's values (SIZE, FORMAT) for the result: call after the copy."""
        return self.source if self.confirm is None else self.confirm()


def app_size_mb(info: ImportInfo, copied_bytes: int) -> int:
    """The app's SIZE: the image size as the datastore export reports it (MB; a qcow2's virtual
    size, whatever its file size), exactly what the stock http and s3 imports print
    (one-7.0:src/market_mad/remotes/http/import:56,67,97 and s3/import:63,167 echo
    MARKET_DRIVER_ACTION_DATA/SIZE; one-6.10 s3/import:79,183 alike). An image exported back
    from the app gets this SIZE. Only when the export gives none, the bytes copied (rounded
    up to MB)."""
    return info.size_mb if info.size_mb > 0 else size_mb(copied_bytes)


@dataclass(frozen=True)
class ImportResult:
    """What import prints: oned needs all four of SOURCE, MD5, SIZE (MB) and FORMAT."""

    source: str
    md5: str
    size_mb: int
    format: str
    sha256: str = ""

    def to_template(self) -> str:
        return write_template(
            [
                ("SOURCE", self.source),
                ("MD5", self.md5),
                ("SIZE", str(self.size_mb)),
                ("FORMAT", self.format or "raw"),
            ]
        )


@dataclass
class AppEntry:
    """One app published by a catalog monitor (``APP="<base64 template>"``)."""

    name: str
    source: str = ""
    import_id: str = ""
    origin_id: str = "-1"
    type: str = "IMAGE"
    publisher: str = ""
    format: str = ""
    description: str = ""
    version: str = ""
    tags: str = ""
    regtime: int | None = None
    link: str = ""
    size_mb: int | None = None
    md5: str = ""
    architecture: str = ""
    hypervisor: str = ""
    apptemplate64: str = ""
    vmtemplate64: str = ""
    disks: list[dict[str, str]] = field(default_factory=list)
    roles: list[dict[str, str]] = field(default_factory=list)

    def attrs(self) -> list[tuple[str, object]]:
        pairs: list[tuple[str, object]] = [
            ("NAME", self.name),
            ("SOURCE", self.source),
            ("IMPORT_ID", self.import_id),
            ("ORIGIN_ID", self.origin_id),
            ("TYPE", self.type),
            ("PUBLISHER", self.publisher),
            ("FORMAT", self.format),
            ("DESCRIPTION", self.description),
            ("VERSION", self.version),
            ("TAGS", self.tags),
            ("REGTIME", None if self.regtime is None else str(self.regtime)),
            ("LINK", self.link),
            ("SIZE", None if self.size_mb is None else str(self.size_mb)),
            ("MD5", self.md5),
            ("ARCHITECTURE", self.architecture),
            ("HYPERVISOR", self.hypervisor),
            ("APPTEMPLATE64", self.apptemplate64),
            ("VMTEMPLATE64", self.vmtemplate64),
        ]
        pairs = [(n, v) for n, v in pairs if v not in ("", None) or n == "NAME"]
        pairs += [("DISK", d) for d in self.disks]
        pairs += [("ROLE", r) for r in self.roles]
        return pairs

    def to_template(self) -> str:
        return write_template(self.attrs())

    def to_base64(self) -> str:
        return base64.b64encode(self.to_template().encode("utf-8")).decode("ascii")


@dataclass
class MonitorResult:
    used_mb: int
    free_mb: int
    total_mb: int
    apps: list[AppEntry] = field(default_factory=list)

    def to_template(self) -> str:
        text = write_template(
            [
                ("USED_MB", str(self.used_mb)),
                ("FREE_MB", str(self.free_mb)),
                ("TOTAL_MB", str(self.total_mb)),
            ]
        )
        return text + "".join(f'APP="{app.to_base64()}"\n' for app in self.apps)


class Backend(ABC):
    """A marketplace driver: small class, three actions, everything else in helpers."""

    driver: str = ""
    attributes: tuple[Attr, ...] = ()
    """The market attributes the driver reads (README's table), see :mod:`.attributes`."""

    def __init__(self, market: Market, context: Context) -> None:
        self.market = market
        self.context = context

    def import_app(self, request: ImportRequest) -> ImportResult:
        raise NotSupportedError(
            f"marketplace driver '{self.driver}' is a public catalog: apps cannot be imported"
        )

    def delete_app(self, app: App) -> bool:
        """Delete the app's file or object: True when deleted, False when it was not there
        (oned's DELETE of a missing SOURCE succeeds; ``one-market rm`` makes it an error)."""
        raise NotSupportedError(
            f"marketplace driver '{self.driver}' is a public catalog: apps cannot be deleted"
        )

    def check(self) -> Iterator[Check]:
        """Probes of what import and delete need (``one-market check`` runs monitor too); a
        generator, so each line shows as soon as it is known: close it to clean up."""
        yield from ()

    @abstractmethod
    def monitor(self) -> MonitorResult: ...
