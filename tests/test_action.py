"""Decoding MARKET_DRIVER_ACTION_DATA: typed fields, and hostile payloads refused in one line."""

from __future__ import annotations

import base64
import resource
import threading
import time
import tracemalloc

import pytest
from lxml import etree
from onemarket import action
from onemarket.action import (
    APP_TYPE_IMAGE,
    APP_TYPE_VMTEMPLATE,
    ActionData,
    ImportInfo,
    decode_action,
    decode_base64,
    parse_xml,
)
from onemarket.errors import PayloadError

from tests.payloads import (
    action_payload,
    action_xml,
    app_xml,
    b64,
    datastore_xml,
    delete_payload,
    export_output,
    image_xml,
    import_info_xml,
    import_payload,
    market_xml,
    monitor_payload,
)

HTTP_ATTRS = {
    "BASE_URL": "http://frontend.example/appliances",
    "PUBLIC_DIR": "/var/lib/one/market",
    "BRIDGE_LIST": "store1 store2",
}

# --------------------------------------------------------------------------- typed fields


def test_monitor_payload() -> None:
    data = decode_action(
        monitor_payload(
            "s3",
            {"ACCESS_KEY_ID": "AK", "SECRET_ACCESS_KEY": "sk", "REGION": "r", "BUCKET": "b"},
            id=104,
            name="S3 <market> & co",
            app_ids=(1, 2, 3),
            total_mb=100,
        )
    )
    m = data.market
    assert (m.id, m.name, m.driver) == (104, "S3 <market> & co", "s3")
    assert m.attrs["BUCKET"] == "b" and m.attrs["MARKET_MAD"] == "s3"
    assert data.app is None and data.image is None and data.datastore is None
    assert data.import_info is None
    with pytest.raises(PayloadError, match="MARKETPLACEAPP"):
        data.require_app()
    with pytest.raises(PayloadError, match="IMPORT_SOURCE"):
        data.require_import_info()


def test_market_helpers() -> None:
    data = decode_action(
        monitor_payload("http", {"PUBLIC_DIR": "  /srv  ", "EMPTY": "", "F1": "Yes", "F2": "off"})
    )
    m = data.market
    assert m.attr("PUBLIC_DIR") == "/srv"
    assert m.attr("EMPTY") is None and m.attr("EMPTY", "d") == "d"
    assert m.attr("NOPE", "x") == "x"


def test_vector_attributes_are_left_out_of_market_attrs() -> None:
    data = decode_action(monitor_payload("http", {"A": "1", "VEC": {"X": "1"}}))
    assert "VEC" not in data.market.attrs and data.market.attrs["A"] == "1"


def test_delete_payload() -> None:
    app = app_xml(
        id=33,
        name="ubuntu <24.04>",
        source="http://frontend.example/appliances/33-ubuntu",
        md5="0123456789abcdef0123456789abcdef",
        size_mb=2252,
        format="qcow2",
        type=APP_TYPE_IMAGE,
        origin_id=8,
        description="it says <!DOCTYPE html> and ]]> and &amp;",
    )
    data = decode_action(delete_payload("http", HTTP_ATTRS, app))
    a = data.require_app()
    assert a.id == 33 and a.name == "ubuntu <24.04>"
    assert a.source == "http://frontend.example/appliances/33-ubuntu"
    assert a.md5 == "0123456789abcdef0123456789abcdef"
    assert (a.size_mb, a.format, a.type, a.origin_id) == (2252, "qcow2", 1, 8)
    assert a.attrs["DESCRIPTION"] == "it says <!DOCTYPE html> and ]]> and &amp;"
    assert data.market.attrs["PUBLIC_DIR"] == "/var/lib/one/market"


def test_vm_template_app_type() -> None:
    data = decode_action(delete_payload(app=app_xml(type=APP_TYPE_VMTEMPLATE, size_mb=0)))
    assert data.require_app().type == APP_TYPE_VMTEMPLATE


def test_import_payload_as_oned_sends_it() -> None:
    data = decode_action(import_payload("http", HTTP_ATTRS))
    assert data.image is not None and data.datastore is not None
    assert (data.image.id, data.image.name, data.image.size_mb, data.image.format) == (
        12,
        "alpine",
        256,
        "qcow2",
    )
    assert data.image.source == "/var/lib/one/datastores/1/4f1e2c"
    ds = data.datastore
    assert (ds.id, ds.name, ds.ds_mad, ds.tm_mad) == (1, "default", "fs", "ssh")
    assert ds.attrs["TYPE"] == "IMAGE_DS"
    assert data.import_info is None


def test_import_payload_with_import_info() -> None:
    info = import_info_xml(
        source="ssh://store1:/var/lib/one/datastores/1/4f1e2c",
        md5="ABCDEF0123456789ABCDEF0123456789",
        size_mb=256,
        format="qcow2",
        dispose=True,
        dispose_cmd="rm -rf /var/tmp/export-12",
    )
    data = decode_action(import_payload("http", HTTP_ATTRS, import_info=info))
    got = data.require_import_info()
    assert got == ImportInfo(
        source="ssh://store1:/var/lib/one/datastores/1/4f1e2c",
        md5="abcdef0123456789abcdef0123456789",
        size_mb=256,
        format="qcow2",
        dispose=True,
        dispose_cmd="rm -rf /var/tmp/export-12",
    )


def test_ds_export_payload_and_with_import_info_round_trip() -> None:
    data = decode_action(import_payload("http", HTTP_ATTRS))
    ds_doc = etree.fromstring(base64.b64decode(data.ds_export_payload()))
    assert ds_doc.tag == "DS_DRIVER_ACTION_DATA"
    assert [c.tag for c in ds_doc] == ["IMAGE", "DATASTORE"]
    assert ds_doc.findtext("IMAGE/SOURCE") == "/var/lib/one/datastores/1/4f1e2c"
    assert ds_doc.findtext("DATASTORE/DS_MAD") == "fs"

    out = export_output("/var/tmp/x.qcow2", md5="AA" * 16, size_mb=5, format="qcow2", dispose=True)
    info = ImportInfo.from_export_output(("\n  " + out + "\n").encode())
    payload = data.with_import_info(info)
    again = decode_action(payload)
    assert again.import_info == info
    assert again.market == data.market and again.app == data.app
    # applying it twice replaces, never duplicates, the IMPORT_* children
    twice = decode_action(again.with_import_info(info))
    assert len(twice.root.findall("IMPORT_SOURCE")) == 1
    assert twice.import_info == info


def test_ds_export_payload_needs_image_and_datastore() -> None:
    data = decode_action(delete_payload())
    with pytest.raises(PayloadError, match="no IMAGE"):
        data.ds_export_payload()


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (b"<OTHER/>", "not <IMPORT_INFO>"),
        (b"<IMPORT_INFO><MD5>x</MD5></IMPORT_INFO>", "no IMPORT_SOURCE"),
        (b"not xml at all", "not well-formed"),
        (b"", "not well-formed|empty"),
        (
            b"<IMPORT_INFO><IMPORT_SOURCE>a</IMPORT_SOURCE><SIZE>big</SIZE></IMPORT_INFO>",
            "SIZE is not a size in MB",
        ),
    ],
)
def test_export_output_errors(output: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        ImportInfo.from_export_output(output)


@pytest.mark.parametrize(
    ("size", "mb"), [("", 0), ("0", 0), ("12", 12), ("12.0", 12), ("12.1", 13), ("-3", 0)]
)
def test_sizes_in_mb(size: str, mb: int) -> None:
    out = export_output("/x").replace("<SIZE><![CDATA[0]]></SIZE>", f"<SIZE>{size}</SIZE>")
    assert ImportInfo.from_export_output(out.encode()).size_mb == mb


@pytest.mark.parametrize("size", ["1e9", "12 MB", "0x10", "1" * 5000])
def test_bad_sizes(size: str) -> None:
    out = export_output("/x").replace("<SIZE><![CDATA[0]]></SIZE>", f"<SIZE>{size}</SIZE>")
    with pytest.raises(PayloadError, match="SIZE is not a size in MB"):
        ImportInfo.from_export_output(out.encode())


def test_integer_fields_and_defaults() -> None:
    xml = action_xml(
        app="<MARKETPLACEAPP><ID>3</ID><NAME>n</NAME><SIZE>-5</SIZE></MARKETPLACEAPP>",
    )
    app = decode_action(b64(xml)).require_app()
    assert app.size_mb == 0 and app.type == APP_TYPE_IMAGE and app.origin_id == -1
    bad = action_xml(app="<MARKETPLACEAPP><ID>three</ID></MARKETPLACEAPP>")
    with pytest.raises(PayloadError, match="ID is not an integer"):
        decode_action(b64(bad))


def test_decoding_is_thread_safe() -> None:
    payloads = [import_payload("http", {"N": str(i)}) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(50):
                assert decode_action(payloads[i]).market.attrs["N"] == str(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


# --------------------------------------------------------------------------- hostile payloads


def _lol(depth: int = 10, width: int = 10, encoding: str = "utf-8") -> bytes:
    ents = '<!ENTITY lol0 "lol">\n' + "".join(
        f'<!ENTITY lol{i} "' + f"&lol{i - 1};" * width + '">\n' for i in range(1, depth)
    )
    doc = (
        f'<?xml version="1.0" encoding="{encoding}"?>\n<!DOCTYPE MARKET_DRIVER_ACTION_DATA [\n'
        f"{ents}]>\n<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><NAME>&lol{depth - 1};</NAME>"
        "</MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
    )
    return doc.encode(encoding)


def _external(url: str, encoding: str = "utf-8", parameter: bool = False) -> bytes:
    if parameter:
        dtd = f'<!DOCTYPE M [<!ENTITY % p SYSTEM "{url}"> %p;]>'
        body = "<NAME>x</NAME>"
    else:
        dtd = f'<!DOCTYPE M [<!ENTITY x SYSTEM "{url}">]>'
        body = "<NAME>&x;</NAME>"
    doc = (
        f'<?xml version="1.0" encoding="{encoding}"?>{dtd}'
        f"<MARKET_DRIVER_ACTION_DATA><MARKETPLACE>{body}</MARKETPLACE>"
        "</MARKET_DRIVER_ACTION_DATA>"
    )
    return doc.encode(encoding)


def _hostile_documents(http_url: str) -> dict[str, bytes]:
    docs = {
        "billion laughs": _lol(),
        "billion laughs utf-16": _lol(encoding="utf-16"),
        "quadratic blowup": (
            '<!DOCTYPE M [<!ENTITY a "' + "x" * 50_000 + '">]>'
            "<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><NAME>" + "&a;" * 50_000 + "</NAME>"
            "</MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
        ).encode(),
        "file entity": _external("file:///etc/passwd"),
        "file entity utf-16": _external("file:///etc/passwd", "utf-16"),
        "http entity": _external(http_url),
        "http entity utf-16": _external(http_url, "utf-16"),
        "http parameter entity": _external(http_url, parameter=True),
        "external dtd": (
            f'<!DOCTYPE M SYSTEM "{http_url}"><MARKET_DRIVER_ACTION_DATA><MARKETPLACE/>'
            "</MARKET_DRIVER_ACTION_DATA>"
        ).encode(),
        "doctype after comment and pi": (
            b'\xef\xbb\xbf<?xml version="1.0"?><!-- c --><?pi x?>\n<!doctype M>'
            b"<MARKET_DRIVER_ACTION_DATA><MARKETPLACE/></MARKET_DRIVER_ACTION_DATA>"
        ),
        "xinclude": (
            b'<MARKET_DRIVER_ACTION_DATA xmlns:xi="http://www.w3.org/2001/XInclude">'
            b'<MARKETPLACE><NAME><xi:include href="file:///etc/passwd" parse="text"/></NAME>'
            b"</MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
        ),
    }
    return docs


def test_hostile_payloads_are_one_line_payload_errors_fast_and_flat(httpd) -> None:
    httpd.routes["/evil"] = b'<!ENTITY leak "SECRET-FROM-NETWORK">'
    docs = _hostile_documents(f"{httpd.url}/evil")
    # tracemalloc sees Python's allocations, the RSS high-water mark also libxml2's
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for label, doc in docs.items():
        tracemalloc.start()
        started = time.monotonic()
        try:
            data = decode_action(base64.b64encode(doc))
        except PayloadError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 300, label
            assert "lol" not in message and "SECRET" not in message, label
        else:
            # only the XInclude document parses: it must stay an inert element
            assert label == "xinclude", label
            assert "root:" not in etree.tostring(data.root).decode()
        finally:
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert elapsed < 1.0, f"{label} took {elapsed:.2f} s"
        assert peak < 16 * 1024 * 1024, f"{label} peaked at {peak} bytes"
    rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb
    assert rss_growth_kb < 64 * 1024, f"peak RSS grew by {rss_growth_kb} KiB"
    assert not httpd.requests, "the parser reached the network"


def test_dtd_refused_before_any_parse() -> None:
    with pytest.raises(PayloadError, match="DTD or entity declaration"):
        parse_xml(_lol())
    with pytest.raises(PayloadError, match="DTD or entity declaration"):
        parse_xml(_external("file:///etc/passwd", "utf-16"))


def test_doctype_text_inside_cdata_is_fine() -> None:
    xml = action_xml(app=app_xml(description="<!DOCTYPE html><!ENTITY x 'y'>"))
    app = decode_action(b64(xml)).require_app()
    assert app.attrs["DESCRIPTION"] == "<!DOCTYPE html><!ENTITY x 'y'>"


def test_oversized_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(action, "MAX_PAYLOAD_BYTES", 4096)
    small = monitor_payload()
    decode_action(small)
    big_app = app_xml(description="x" * 10_000)
    with pytest.raises(PayloadError, match="larger than 4096 bytes"):
        decode_action(action_payload(app=big_app))
    with pytest.raises(PayloadError, match="larger than 4096 bytes"):
        decode_action("QUFB" * 5000)
    with pytest.raises(PayloadError, match="larger than 4096 bytes"):
        parse_xml(b"<A>" + b"x" * 5000 + b"</A>")


@pytest.mark.parametrize(
    "payload",
    [
        "not base64!",
        "YWJj$ZGVm",
        "YWJ",
        "Y",
        "YW==Jj",
        "====",
        "ÀÁÂ",
        "YWJj\x00",
        b"\xff\xfe",
    ],
)
def test_invalid_base64(payload: str | bytes) -> None:
    with pytest.raises(PayloadError, match="not valid base64") as err:
        decode_base64(payload)
    assert "\n" not in str(err.value)


def test_base64_with_line_breaks_is_accepted() -> None:
    raw = action_xml().encode()
    wrapped = base64.encodebytes(raw)  # 76-column lines, as some tools write
    assert b"\n" in wrapped
    assert decode_action(wrapped).market.driver == "http"
    assert decode_action(wrapped.decode()).market.driver == "http"


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b"hello world", "not well-formed XML"),
        (b"", "not well-formed XML|empty"),
        (b"   ", "not well-formed XML|empty"),
        (b"<MARKET_DRIVER_ACTION_DATA>", "not well-formed XML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not well-formed XML"),
        (b"<A>&undefined;</A>", "not well-formed XML"),
        (b"<DS_DRIVER_ACTION_DATA/>", "not <MARKET_DRIVER_ACTION_DATA>"),
        (b"<MARKET_DRIVER_ACTION_DATA/>", "no MARKETPLACE"),
        (
            b"<MARKET_DRIVER_ACTION_DATA><MARKETPLACEAPP/></MARKET_DRIVER_ACTION_DATA>",
            "no MARKETPLACE",
        ),
    ],
)
def test_not_an_action_document(doc: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as err:
        decode_action(base64.b64encode(doc))
    assert "\n" not in str(err.value)


def test_action_data_type() -> None:
    data = decode_action(import_payload())
    assert isinstance(data, ActionData)
    assert data.root.tag == "MARKET_DRIVER_ACTION_DATA"
    # builders compose: a bare market, then every part
    full = action_xml(market_xml("one"), app_xml(), image_xml(), datastore_xml(), "")
    assert decode_action(b64(full)).market.driver == "one"


def test_export_output_as_real_exports_print_it() -> None:
    """The Ceph export ends with a stray quote; older exports leave '&' unescaped."""
    ceph = (
        b"<IMPORT_INFO><IMPORT_SOURCE>rbd://host/one/one-5</IMPORT_SOURCE><MD5>abc</MD5>"
        b'<SIZE>10</SIZE><FORMAT>raw</FORMAT><DISPOSE>NO</DISPOSE>\n</IMPORT_INFO>"\n'
    )
    info = ImportInfo.from_export_output(ceph)
    assert (info.source, info.size_mb, info.format) == ("rbd://host/one/one-5", 10, "raw")
    amp = b"<IMPORT_INFO><IMPORT_SOURCE>http://h/x?a=1&b=2&amp;c=3</IMPORT_SOURCE></IMPORT_INFO>"
    assert ImportInfo.from_export_output(amp).source == "http://h/x?a=1&b=2&c=3"
    with pytest.raises(PayloadError):
        ImportInfo.from_export_output(b"<IMPORT_INFO><IMPORT_SOURCE>x</IMPORT_SOURCE>")


def test_ds_export_payload_keeps_oneds_bytes() -> None:
    # the stock MAD passes IMAGE and DATASTORE as oned sent them (one_market.rb, import:
    # xml.element_xml): CDATA sections, empty elements and spacing stay
    image = (
        "<IMAGE><ID>7</ID><NAME><![CDATA[deb <12> & co]]></NAME><PATH></PATH>"
        '<TEMPLATE><DESCRIPTION><![CDATA[a "b" ]]]]><![CDATA[> c]]></DESCRIPTION>'
        "<EMPTY/></TEMPLATE></IMAGE>"
    )
    datastore = "<DATASTORE>\n  <ID>1</ID><DS_MAD><![CDATA[fs]]></DS_MAD>\n</DATASTORE>"
    doc = (
        "<MARKET_DRIVER_ACTION_DATA><MARKETPLACEAPP><ID>1</ID><TEMPLATE><IMAGE>inner</IMAGE>"
        "</TEMPLATE></MARKETPLACEAPP><MARKETPLACE><ID>0</ID><MARKET_MAD>http</MARKET_MAD>"
        f"</MARKETPLACE><!-- a <IMAGE> in a comment -->{image}{datastore}"
        "</MARKET_DRIVER_ACTION_DATA>"
    )
    data = decode_action(base64.b64encode(doc.encode()))
    sent = base64.b64decode(data.ds_export_payload()).decode()
    assert sent == f"<DS_DRIVER_ACTION_DATA>{image}{datastore}</DS_DRIVER_ACTION_DATA>"


def test_import_info_is_found_by_two_scans() -> None:
    # from the first opening to the last end, without a backtracking pattern (a ".*" pattern was
    # quadratic on repeated openings, and this runs in the MAD's loop)
    out = b'x<IMPORT_INFO><IMPORT_SOURCE>a</IMPORT_SOURCE></IMPORT_INFO>"\n<IMPORT_INFO>'
    assert action._import_info_element(out) == out[1:-15]
    assert action._import_info_element(b"<IMPORT_INFO>" * 1000) == b"<IMPORT_INFO>" * 1000
    with pytest.raises(PayloadError):
        ImportInfo.from_export_output(b"<IMPORT_INFO>" * 200_000)
