"""MARKET_DRIVER_ACTION_DATA: decoded once, with a hardened parser, into typed objects.

The payload comes from oned (base64 of XML). It is untrusted in the sense that it may be huge or
malformed, so the parser refuses DTDs and entities outright, never touches the network, and
bounds the size before parsing. Everything deeper in the code uses the dataclasses below.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import re
import threading
from dataclasses import dataclass, field
from decimal import Decimal

from lxml import etree

from .errors import PayloadError
from .units import parse_int, shown

MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
"""Largest decoded action document accepted (an app template is a few KB; this bounds memory)."""
MAX_BASE64_BYTES = MAX_PAYLOAD_BYTES * 4 // 3 + 16
"""Longest base64 text of action data taken (the largest payload, plus line breaks' slack)."""

APP_TYPE_IMAGE = 1
APP_TYPE_VMTEMPLATE = 2
APP_TYPE_SERVICE_TEMPLATE = 3

_PROLOG_RE = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:<\?.*?\?>\s*|<!--.*?-->\s*)*", re.DOTALL)
"""What may precede a DOCTYPE: BOM, XML declaration, processing instructions, comments."""
_DTD_RE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_B64_RE = re.compile(rb"[A-Za-z0-9+/=\s]*")
_DECIMAL_RE = re.compile(r"[+-]?\d{1,18}(\.\d{0,18})?")
"""A size: at most 18 digits (an exabyte is 10^12 MB), so it always fits everywhere."""


def _new_parser() -> etree.XMLParser:
    # lxml already leaves DTD loading, DTD validation and huge trees off; entities and the
    # network are the ones to refuse explicitly.
    return etree.XMLParser(
        resolve_entities=False, no_network=True, remove_comments=True, remove_pis=True
    )


_local = threading.local()


def _parser() -> etree.XMLParser:
    """One hardened parser per thread (an lxml parser object must not be shared by threads)."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = _new_parser()
    return parser


def decode_base64(payload: str | bytes) -> bytes:
    """Strict base64 decoding with a size bound; a clear error otherwise."""
    raw = payload.encode("ascii", "replace") if isinstance(payload, str) else payload
    if len(raw) > MAX_BASE64_BYTES:
        raise PayloadError(f"action data larger than {MAX_PAYLOAD_BYTES} bytes")
    if not _B64_RE.fullmatch(raw):
        raise PayloadError("action data is not valid base64")
    try:
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"action data is not valid base64 ({exc})") from None


def parse_xml(data: bytes, what: str = "action data") -> etree._Element:
    """Parse an XML document with DTDs, entities and network access refused."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{what} larger than {MAX_PAYLOAD_BYTES} bytes")
    refused = PayloadError(f"{what} contains a DTD or entity declaration, which is refused")
    # A DTD can only come before the root element; looking there only keeps a CDATA value
    # such as "<!DOCTYPE html>" in an app description from being refused.
    if _DTD_RE.match(data, _PROLOG_RE.match(data).end()):  # type: ignore[union-attr]
        raise refused
    try:
        root = etree.fromstring(data, _parser())
    except (etree.XMLSyntaxError, etree.ParserError, ValueError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        raise PayloadError(f"{what} is not well-formed XML ({msg})") from None
    if root is None:
        raise PayloadError(f"{what} is empty")
    # Other encodings (UTF-16...) hide a DTD from the byte check: refuse it after the parse,
    # which neither expanded nor fetched anything (entities off, no DTD loading, no network).
    if root.getroottree().docinfo.internalDTD is not None or root.getroottree().docinfo.doctype:
        raise refused
    return root


def _text(el: etree._Element | None, tag: str, default: str = "") -> str:
    if el is None:
        return default
    child = el.find(tag)
    if child is None or child.text is None:
        return default
    return child.text.strip()


def _int(el: etree._Element | None, tag: str, default: int = -1) -> int:
    value = _text(el, tag)
    if not value:
        return default
    try:
        return parse_int(value)
    except ValueError:
        raise PayloadError(f"{tag} is not an integer: {shown(value)}") from None


def _size_mb(el: etree._Element | None, tag: str) -> int:
    """A size in MB: an integer, or a decimal rounded up (never below 0)."""
    value = _text(el, tag)
    if not value:
        return 0
    if not _DECIMAL_RE.fullmatch(value):
        raise PayloadError(f"{tag} is not a size in MB: {value[:40]!r}")
    return max(math.ceil(Decimal(value)), 0)


def template_attrs(el: etree._Element | None) -> dict[str, str]:
    """Single-valued attributes of a TEMPLATE element (vector attributes are left out)."""
    out: dict[str, str] = {}
    if el is None:
        return out
    for child in el:
        if not isinstance(child.tag, str) or len(child):
            continue
        out.setdefault(child.tag, (child.text or "").strip())
    return out


@dataclass(frozen=True)
class Market:
    """A marketplace: identity and the driver attributes of its TEMPLATE."""

    id: int
    name: str
    driver: str
    attrs: dict[str, str] = field(default_factory=dict)

    def attr(self, name: str, default: str | None = None) -> str | None:
        value = self.attrs.get(name, "")
        return value if value != "" else default

    @classmethod
    def from_element(cls, el: etree._Element) -> Market:
        tmpl = el.find("TEMPLATE")
        attrs = template_attrs(tmpl)
        driver = _text(el, "MARKET_MAD") or attrs.get("MARKET_MAD", "")
        return cls(id=_int(el, "ID"), name=_text(el, "NAME"), driver=driver, attrs=attrs)


def _identity(el: etree._Element) -> dict:
    """ID, NAME, SOURCE and SIZE, which apps and images carry alike."""
    return {
        "id": _int(el, "ID"),
        "name": _text(el, "NAME"),
        "source": _text(el, "SOURCE"),
        "size_mb": _size_mb(el, "SIZE"),
    }


@dataclass(frozen=True)
class App:
    """A marketplace app, as oned sends it for IMPORT and DELETE."""

    id: int
    name: str
    source: str = ""
    md5: str = ""
    size_mb: int = 0
    format: str = ""
    type: int = APP_TYPE_IMAGE
    origin_id: int = -1
    attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_element(cls, el: etree._Element) -> App:
        return cls(
            **_identity(el),
            md5=_text(el, "MD5"),
            format=_text(el, "FORMAT"),
            type=_int(el, "TYPE", APP_TYPE_IMAGE),
            origin_id=_int(el, "ORIGIN_ID"),
            attrs=template_attrs(el.find("TEMPLATE")),
        )


@dataclass(frozen=True)
class Image:
    id: int
    name: str
    source: str
    size_mb: int
    format: str

    @classmethod
    def from_element(cls, el: etree._Element) -> Image:
        return cls(
            **_identity(el),
            format=_text(el, "FORMAT") or _text(el.find("TEMPLATE"), "FORMAT"),
        )


@dataclass(frozen=True)
class Datastore:
    id: int
    name: str
    ds_mad: str
    tm_mad: str
    attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_element(cls, el: etree._Element) -> Datastore:
        tmpl = el.find("TEMPLATE")
        return cls(
            id=_int(el, "ID"),
            name=_text(el, "NAME"),
            ds_mad=_text(el, "DS_MAD") or _text(tmpl, "DS_MAD"),
            tm_mad=_text(el, "TM_MAD") or _text(tmpl, "TM_MAD"),
            attrs=template_attrs(tmpl),
        )


@dataclass(frozen=True)
class ImportInfo:
    """What the datastore's export action says about the image to import."""

    source: str
    md5: str = ""
    size_mb: int = 0
    format: str = ""
    dispose: bool = False
    dispose_cmd: str = ""

    @classmethod
    def from_element(cls, el: etree._Element) -> ImportInfo:
        return cls(
            source=_text(el, "IMPORT_SOURCE"),
            md5=_text(el, "MD5").lower(),
            size_mb=_size_mb(el, "SIZE"),
            format=_text(el, "FORMAT"),
            dispose=_text(el, "DISPOSE").upper() == "YES",
            dispose_cmd=_text(el, "DISPOSE_CMD"),
        )

    @classmethod
    def from_export_output(cls, data: bytes) -> ImportInfo:
        """Parse the ``<IMPORT_INFO>`` document printed by a datastore's export action.

        As lenient as the stock MAD's parser where real exports need it: text around the
        element is ignored (the Ceph export ends with a stray quote) and a bare ``&`` (older
        exports do not escape IMPORT_SOURCE) is read as a literal ampersand.
        """
        doc = _import_info_element(data)
        root = parse_xml(_BARE_AMP_RE.sub(b"&amp;", doc), "datastore export output")
        if root.tag != "IMPORT_INFO":
            raise PayloadError(f"datastore export printed <{root.tag}>, not <IMPORT_INFO>")
        info = cls.from_element(root)
        if not info.source:
            raise PayloadError("datastore export printed no IMPORT_SOURCE")
        return info


def _import_info_element(data: bytes) -> bytes:
    """From the first ``<IMPORT_INFO>`` to the last ``</IMPORT_INFO>``: two linear scans (a
    pattern with ``.*`` was quadratic on repeated openings, and runs in the MAD's loop)."""
    start = data.find(b"<IMPORT_INFO>")
    end = data.rfind(b"</IMPORT_INFO>")
    if start < 0 or end < start:
        return data.strip()
    return data[start : end + len(b"</IMPORT_INFO>")]


_TOKEN_RE = re.compile(
    rb"<!\[CDATA\[.*?\]\]>|<!--.*?-->|<\?.*?\?>"
    rb"|<(/?)([A-Za-z_][\w.:-]*)(?:[^>\"'/]|/(?!>)|\"[^\"]*\"|'[^']*')*(/?)>",
    re.DOTALL,
)
"""Markup of a well-formed document: CDATA, comments, PIs, and tags (group 1 "/" for an end
tag, group 2 the name, group 3 "/" for an empty-element tag)."""


def top_level_elements(doc: bytes, tags: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the root's first child of each tag in ``tags``, exactly as in ``doc``.

    For documents lxml already accepted: what is passed on then keeps oned's own bytes (CDATA
    sections, empty elements, spacing), as the stock MAD passes them.
    """
    wanted = {t.encode() for t in tags}
    found: dict[str, bytes] = {}
    depth = 0
    start = -1
    current = b""
    for m in _TOKEN_RE.finditer(doc):
        name = m.group(2)
        if name is None:
            continue  # CDATA, comment or PI
        if m.group(1):  # end tag
            depth -= 1
            if depth == 1 and current and name == current:
                found.setdefault(current.decode(), doc[start : m.end()])
                current = b""
            continue
        if depth == 1 and name in wanted and name.decode() not in found:
            if m.group(3):
                found[name.decode()] = m.group()
                continue
            start, current = m.start(), name
        if not m.group(3):
            depth += 1
    return found


_BARE_AMP_RE = re.compile(rb"&(?!(?:amp|lt|gt|quot|apos|#[0-9]+|#x[0-9A-Fa-f]+);)")

IMPORT_INFO_TAGS = ("IMPORT_SOURCE", "MD5", "SIZE", "FORMAT", "DISPOSE", "DISPOSE_CMD")


@dataclass
class ActionData:
    """A decoded MARKET_DRIVER_ACTION_DATA document."""

    root: etree._Element
    market: Market
    raw: bytes = b""
    """The decoded document as oned sent it."""
    app: App | None = None
    image: Image | None = None
    datastore: Datastore | None = None
    import_info: ImportInfo | None = None

    def require_app(self) -> App:
        if self.app is None:
            raise PayloadError("action data has no MARKETPLACEAPP")
        return self.app

    def require_import_info(self) -> ImportInfo:
        if self.import_info is None or not self.import_info.source:
            raise PayloadError("action data has no IMPORT_SOURCE")
        return self.import_info

    def ds_export_payload(self) -> bytes:
        """Base64 of ``<DS_DRIVER_ACTION_DATA>`` (IMAGE and DATASTORE) for the export action.

        The two elements are oned's bytes, CDATA included, as the stock MAD's
        ``xml.element_xml`` passes them (src/market_mad/one_market.rb, ``import``): an export
        that reads its input with a pattern sees what it would see under the stock MAD.
        """
        parts = top_level_elements(self.raw, ("IMAGE", "DATASTORE")) if self.raw else {}
        body = []
        for tag in ("IMAGE", "DATASTORE"):
            if tag not in parts:
                el = self.root.find(tag)
                if el is None:
                    raise PayloadError(f"IMPORT action data has no {tag}")
                parts[tag] = etree.tostring(el, with_tail=False)
            body.append(parts[tag])
        doc = b"<DS_DRIVER_ACTION_DATA>" + b"".join(body) + b"</DS_DRIVER_ACTION_DATA>"
        return base64.b64encode(doc)

    def withdrawal_payload(self, source: str) -> bytes:
        """DELETE action data for the app an import just stored at ``source`` (base64): the
        MAD withdraws an import whose success oned can no longer be told of."""
        root = copy.deepcopy(self.root)
        for tag in ("IMAGE", "DATASTORE", *IMPORT_INFO_TAGS):
            for old in root.findall(tag):
                root.remove(old)
        app = root.find("MARKETPLACEAPP")
        if app is None:
            raise PayloadError("action data has no MARKETPLACEAPP")
        for old in app.findall("SOURCE"):
            app.remove(old)
        etree.SubElement(app, "SOURCE").text = source
        return base64.b64encode(etree.tostring(root))

    def with_import_info(self, info: ImportInfo) -> bytes:
        """The document with the export's IMPORT_* children added, as base64 for the import."""
        root = copy.deepcopy(self.root)
        for tag in IMPORT_INFO_TAGS:
            for old in root.findall(tag):
                root.remove(old)
        values = (
            info.source,
            info.md5,
            str(info.size_mb),
            info.format,
            "YES" if info.dispose else "NO",
            info.dispose_cmd,
        )
        for tag, value in zip(IMPORT_INFO_TAGS, values, strict=True):
            etree.SubElement(root, tag).text = value
        return base64.b64encode(etree.tostring(root))


def decode_action(payload: str | bytes) -> ActionData:
    """Decode base64 MARKET_DRIVER_ACTION_DATA into typed objects."""
    raw = decode_base64(payload)
    root = parse_xml(raw)
    if root.tag != "MARKET_DRIVER_ACTION_DATA":
        raise PayloadError(f"action data is <{root.tag}>, not <MARKET_DRIVER_ACTION_DATA>")
    market_el = root.find("MARKETPLACE")
    if market_el is None:
        raise PayloadError("action data has no MARKETPLACE")
    app_el = root.find("MARKETPLACEAPP")
    image_el = root.find("IMAGE")
    ds_el = root.find("DATASTORE")
    import_info = ImportInfo.from_element(root) if root.find("IMPORT_SOURCE") is not None else None
    return ActionData(
        root=root,
        market=Market.from_element(market_el),
        raw=raw,
        app=App.from_element(app_el) if app_el is not None else None,
        image=Image.from_element(image_el) if image_el is not None else None,
        datastore=Datastore.from_element(ds_el) if ds_el is not None else None,
        import_info=import_info,
    )
