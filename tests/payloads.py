"""Builders of MARKET_DRIVER_ACTION_DATA documents shaped like the ones oned 7 sends.

Every builder returns XML text; :func:`action_payload` wraps the parts into the base64 payload
that the MAD and the action executables receive. Strings are written as CDATA sections, as
oned does, so values may hold any text (``]]>`` is split across two sections).

Typical use::

    payload = action_payload(
        market=market_xml("http", {"BASE_URL": url, "PUBLIC_DIR": str(tmp)}),
        app=app_xml(id=7, name="alpine"),
        import_info=import_info_xml(source=str(image_path), md5=md5, size_mb=1),
    )
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from xml.sax.saxutils import escape

MarketAttrs = Mapping[str, str | Mapping[str, str]]


def cdata(value: object) -> str:
    """``value`` as one or more CDATA sections (``]]>`` cannot appear inside one)."""
    text = str(value)
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def elem(tag: str, value: object, raw: bool = False) -> str:
    """``<TAG>value</TAG>``; strings as CDATA, numbers plain, ``raw`` inserts XML as is."""
    if raw:
        return f"<{tag}>{value}</{tag}>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<{tag}>{value}</{tag}>"
    return f"<{tag}>{cdata(value)}</{tag}>"


def template_xml(attrs: MarketAttrs | None, tag: str = "TEMPLATE") -> str:
    """A TEMPLATE element; a mapping value becomes a vector attribute."""
    parts = []
    for name, value in (attrs or {}).items():
        if isinstance(value, Mapping):
            parts.append(elem(name, "".join(elem(k, v) for k, v in value.items()), raw=True))
        else:
            parts.append(elem(name, value))
    return elem(tag, "".join(parts), raw=True)


def _owned(id: int) -> str:
    """The ID and owner (oneadmin) that every pool object starts with."""
    return (
        elem("ID", id)
        + elem("UID", 0)
        + elem("GID", 0)
        + elem("UNAME", "oneadmin")
        + elem("GNAME", "oneadmin")
    )


def _permissions() -> str:
    bits = ("OWNER_U", "OWNER_M", "OWNER_A", "GROUP_U", "GROUP_M", "GROUP_A")
    bits += ("OTHER_U", "OTHER_M", "OTHER_A")
    values = (1, 1, 0, 0, 0, 0, 0, 0, 0)
    return elem(
        "PERMISSIONS", "".join(elem(b, v) for b, v in zip(bits, values, strict=True)), raw=True
    )


def market_xml(
    driver: str = "http",
    attrs: MarketAttrs | None = None,
    id: int = 100,
    name: str = "private",
    app_ids: tuple[int, ...] = (),
    total_mb: int = 0,
    free_mb: int = 0,
    used_mb: int = 0,
) -> str:
    """A MARKETPLACE element; ``attrs`` is its TEMPLATE (MARKET_MAD is added as oned does)."""
    tmpl: dict[str, str | Mapping[str, str]] = dict(attrs or {})
    tmpl.setdefault("MARKET_MAD", driver)
    apps = "".join(elem("ID", i) for i in app_ids)
    return elem(
        "MARKETPLACE",
        _owned(id)
        + elem("NAME", name)
        + elem("STATE", 0)
        + elem("MARKET_MAD", driver)
        + elem("ZONE_ID", "0")
        + elem("TOTAL_MB", total_mb)
        + elem("FREE_MB", free_mb)
        + elem("USED_MB", used_mb)
        + elem("MARKETPLACEAPPS", apps, raw=True)
        + _permissions()
        + template_xml(tmpl),
        raw=True,
    )


def app_xml(
    id: int = 7,
    name: str = "alpine-3.20",
    source: str = "",
    md5: str = "",
    size_mb: int = 0,
    format: str = "",
    type: int = 1,
    origin_id: int = 12,
    market_id: int = 100,
    market_name: str = "private",
    description: str = "",
    version: str = "0.0",
    template: MarketAttrs | None = None,
) -> str:
    """A MARKETPLACEAPP element (TYPE 1 image, 2 VM template, 3 service template)."""
    tmpl = dict(template) if template is not None else {"DESCRIPTION": description}
    return elem(
        "MARKETPLACEAPP",
        _owned(id)
        + elem("LOCK", "", raw=True)
        + elem("REGTIME", 1_700_000_000)
        + elem("NAME", name)
        + elem("ZONE_ID", "0")
        + elem("ORIGIN_ID", str(origin_id))
        + elem("SOURCE", source)
        + elem("MD5", md5)
        + elem("SIZE", str(size_mb))
        + elem("DESCRIPTION", description)
        + elem("VERSION", version)
        + elem("FORMAT", format)
        + elem("APPTEMPLATE64", "")
        + elem("MARKETPLACE_ID", str(market_id))
        + elem("MARKETPLACE", market_name)
        + elem("STATE", 0)
        + elem("TYPE", type)
        + _permissions()
        + template_xml(tmpl),
        raw=True,
    )


def image_xml(
    id: int = 12,
    name: str = "alpine",
    source: str = "/var/lib/one/datastores/1/4f1e2c",
    size_mb: int = 256,
    format: str = "qcow2",
    datastore_id: int = 1,
    datastore: str = "default",
    template: MarketAttrs | None = None,
) -> str:
    """An IMAGE element as oned puts it in an IMPORT (the image being published)."""
    return elem(
        "IMAGE",
        _owned(id)
        + elem("NAME", name)
        + _permissions()
        + elem("TYPE", 0)
        + elem("DISK_TYPE", 0)
        + elem("PERSISTENT", 0)
        + elem("REGTIME", 1_700_000_000)
        + elem("SOURCE", source)
        + elem("PATH", "")
        + elem("FORMAT", format)
        + elem("FS", "")
        + elem("SIZE", size_mb)
        + elem("STATE", 1)
        + elem("PREV_STATE", 1)
        + elem("RUNNING_VMS", 0)
        + elem("CLONING_OPS", 0)
        + elem("CLONING_ID", -1)
        + elem("TARGET_SNAPSHOT", -1)
        + elem("DATASTORE_ID", datastore_id)
        + elem("DATASTORE", datastore)
        + elem("VMS", "", raw=True)
        + elem("CLONES", "", raw=True)
        + elem("APP_CLONES", "", raw=True)
        + template_xml(template or {"DEV_PREFIX": "vd", "DRIVER": format})
        + elem("SNAPSHOTS", elem("ALLOW_ORPHANS", "NO") + elem("CURRENT_BASE", -1), raw=True),
        raw=True,
    )


def datastore_xml(
    id: int = 1,
    name: str = "default",
    ds_mad: str = "fs",
    tm_mad: str = "ssh",
    base_path: str = "/var/lib/one/datastores/1",
    template: MarketAttrs | None = None,
) -> str:
    """A DATASTORE element (the image datastore the app is exported from)."""
    tmpl: dict[str, str | Mapping[str, str]] = {
        "ALLOW_ORPHANS": "NO",
        "CLONE_TARGET": "SYSTEM",
        "DISK_TYPE": "FILE",
        "DS_MAD": ds_mad,
        "LN_TARGET": "SYSTEM",
        "TM_MAD": tm_mad,
        "TYPE": "IMAGE_DS",
    }
    tmpl.update(template or {})
    return elem(
        "DATASTORE",
        _owned(id)
        + elem("NAME", name)
        + _permissions()
        + elem("DS_MAD", ds_mad)
        + elem("TM_MAD", tm_mad)
        + elem("BASE_PATH", base_path)
        + elem("TYPE", 0)
        + elem("DISK_TYPE", 0)
        + elem("STATE", 0)
        + elem("CLUSTERS", elem("ID", 0), raw=True)
        + elem("TOTAL_MB", 102400)
        + elem("FREE_MB", 51200)
        + elem("USED_MB", 51200)
        + elem("IMAGES", elem("ID", 12), raw=True)
        + template_xml(tmpl),
        raw=True,
    )


def import_info_xml(
    source: str,
    md5: str = "",
    size_mb: int = 0,
    format: str = "raw",
    dispose: bool = False,
    dispose_cmd: str = "",
) -> str:
    """The IMPORT_* children the MAD adds to MARKET_DRIVER_ACTION_DATA before a market import."""
    return (
        elem("IMPORT_SOURCE", source)
        + elem("MD5", md5)
        + elem("SIZE", str(size_mb))
        + elem("FORMAT", format)
        + elem("DISPOSE", "YES" if dispose else "NO")
        + elem("DISPOSE_CMD", dispose_cmd)
    )


def export_output(
    source: str,
    md5: str = "",
    size_mb: int = 0,
    format: str = "raw",
    dispose: bool = False,
    dispose_cmd: str = "",
) -> str:
    """What a datastore ``export`` action prints: one ``<IMPORT_INFO>`` document."""
    return elem(
        "IMPORT_INFO",
        import_info_xml(source, md5, size_mb, format, dispose, dispose_cmd),
        raw=True,
    )


def action_xml(
    market: str | None = None,
    app: str | None = None,
    image: str | None = None,
    datastore: str | None = None,
    import_info: str | None = None,
) -> str:
    """A MARKET_DRIVER_ACTION_DATA document from the parts given (market defaults to http)."""
    parts = [app, market if market is not None else market_xml(), image, datastore, import_info]
    body = "".join(p for p in parts if p)
    return f"<MARKET_DRIVER_ACTION_DATA>{body}</MARKET_DRIVER_ACTION_DATA>"


def b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def action_payload(
    market: str | None = None,
    app: str | None = None,
    image: str | None = None,
    datastore: str | None = None,
    import_info: str | None = None,
) -> str:
    """Base64 MARKET_DRIVER_ACTION_DATA, as passed to ``remotes/market/<driver>/<action>``."""
    return b64(action_xml(market, app, image, datastore, import_info))


def monitor_payload(driver: str = "http", attrs: MarketAttrs | None = None, **market) -> str:
    """MONITOR: just the MARKETPLACE."""
    return action_payload(market=market_xml(driver, attrs, **market))


def delete_payload(
    driver: str = "http", attrs: MarketAttrs | None = None, app: str | None = None
) -> str:
    """DELETE: the MARKETPLACEAPP and its MARKETPLACE."""
    return action_payload(market=market_xml(driver, attrs), app=app or app_xml())


def import_payload(
    driver: str = "http",
    attrs: MarketAttrs | None = None,
    app: str | None = None,
    import_info: str | None = None,
    image: str | None = None,
    datastore: str | None = None,
) -> str:
    """IMPORT as oned sends it to the MAD (APP, MARKETPLACE, IMAGE, DATASTORE), plus the
    IMPORT_* children when ``import_info`` is given (what the market import action receives)."""
    return action_payload(
        market=market_xml(driver, attrs),
        app=app or app_xml(),
        image=image or image_xml(),
        datastore=datastore or datastore_xml(),
        import_info=import_info,
    )


def xml_text(value: str) -> str:
    """``value`` escaped for XML character data (for hand-written fixtures)."""
    return escape(value)
