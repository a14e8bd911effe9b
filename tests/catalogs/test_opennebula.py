"""The ``one`` driver monitor against a catalog served on loopback (tests/servers/httpd.py)."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onemarket import driverlog, web
from onemarket.action import App, Market
from onemarket.backends.base import Context, MonitorResult
from onemarket.catalogs import opennebula
from onemarket.catalogs.opennebula import OpenNebulaCatalog
from onemarket.errors import ConfigError, NotSupportedError, RemoteError
from onemarket.installation import Installation
from onemarket.template import Template, parse_template

from tests.servers import free_port
from tests.servers.httpd import StaticHttpServer, failing_then, slow, truncated

REPO = Path(__file__).resolve().parents[2]
CATALOG_PATH = REPO / "tests" / "data" / "one-community-appliance.json"
CATALOG_BYTES = CATALOG_PATH.read_bytes()
CATALOG = json.loads(CATALOG_BYTES)
APPLIANCES = CATALOG["appliances"]
ROUTE = "/appliance"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def installation(tmp_path: Path) -> Installation:
    base = tmp_path / "one"
    inst = Installation(base, base / "var" / "remotes", base / "var", base / "lib" / "mads")
    inst.remotes.mkdir(parents=True)
    (inst.remotes / "VERSION").write_text("7.0.0\n")
    return inst


PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback tests must not go through a proxy configured on the machine running them."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", buf)
    return buf


def catalog_bytes(appliances: list) -> bytes:
    return json.dumps({"sEcho": 1, "appliances": appliances}).encode()


def market(endpoint: str, **attrs: str) -> Market:
    return Market(
        id=0, name="OpenNebula Public", driver="one", attrs={"ENDPOINT": endpoint, **attrs}
    )


def run(installation: Installation, endpoint: str, **attrs: str) -> MonitorResult:
    return OpenNebulaCatalog(market(endpoint, **attrs), Context(installation)).monitor()


def parse_output(result: MonitorResult) -> tuple[Template, list[Template]]:
    """The monitor text as oned reads it, and every APP decoded and parsed strictly."""
    text = result.to_template()
    outer = parse_template(text)
    apps = [parse_template(base64.b64decode(v, validate=True)) for v in outer.get_all("APP")]
    return outer, apps


def decoded(t: Template, name: str) -> str:
    value = t.get(name)
    assert value is not None, name
    return base64.b64decode(value, validate=True).decode()


def warns(log: io.StringIO) -> list[str]:
    return [line for line in log.getvalue().splitlines() if line.startswith("WARN: ")]


def expected_attrs(raw: dict, base: str) -> dict[str, str]:
    """Upstream's mapping of one appliance, written out independently of the driver."""
    oid = raw["_id"]["$oid"]
    arch = {"amd64": "x86_64", "arm64": "aarch64", "": "all"}.get(
        (raw.get("os-arch") or "").lower(), (raw.get("os-arch") or "").lower()
    )
    hyper = (raw.get("hypervisor") or "").lower()
    hyper = "kvm" if hyper in ("", "all") else hyper
    out = {
        "NAME": raw["name"],
        "SOURCE": f"{base}/appliance/{oid}/download/0",
        "IMPORT_ID": oid,
        "ORIGIN_ID": "-1",
        "TYPE": raw.get("type") or "IMAGE",
        "PUBLISHER": raw["publisher"],
        "DESCRIPTION": raw["short_description"],
        "VERSION": raw["version"],
        "TAGS": ", ".join(raw["tags"]),
        "REGTIME": str(raw["creation_time"]),
        "LINK": f"{base}/appliance/{oid}",
        "ARCHITECTURE": arch,
        "HYPERVISOR": hyper,
    }
    if raw.get("format"):
        out["FORMAT"] = raw["format"]
    if out["TYPE"] == "IMAGE":
        f = raw["files"][0]
        out["SIZE"] = str(math.ceil(f["size"] / 2**20))
        out["MD5"] = f["md5"]
    else:
        out["SIZE"] = "0"
    return out


def check_vm_template(text: str, raw: dict, arch: str, hyper: str) -> None:
    t = parse_template(text)
    source = json.loads(raw["opennebula_template"])
    names = [n for n in t.names() if n != "SCHED_REQUIREMENTS"]
    assert names == [k.upper() for k, v in source.items() if v not in (None, "", {}, [])]
    for key, value in source.items():
        if isinstance(value, dict) and value and key.upper() != "OS":
            vec = t.get_all(key.upper())[0]
            assert vec == {k.upper(): str(v) for k, v in value.items() if v not in (None, "")}
        elif isinstance(value, str) and value:
            assert t.get(key.upper()) == value
    want = f'HYPERVISOR="{hyper}"' + (f' & ARCH="{arch}"' if arch != "all" else "")
    assert t.get("SCHED_REQUIREMENTS") == want


# --------------------------------------------------------------------------- the catalog


def test_shared_catalog_every_field(httpd: StaticHttpServer, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    result = run(installation, httpd.url + "/")
    outer, apps = parse_output(result)
    assert (outer.get("USED_MB"), outer.get("FREE_MB"), outer.get("TOTAL_MB")) == ("0", "0", "0")
    assert len(apps) == len(APPLIANCES) == 14
    assert warns(log) == []
    assert {t.get("TYPE") for t in apps} == {"IMAGE", "VMTEMPLATE", "SERVICE_TEMPLATE"}
    ua = httpd.requests[0].headers["User-Agent"]
    assert ua == "OpenNebula 7.0.0 (Market Driver)"

    for raw, t in zip(APPLIANCES, apps, strict=True):
        want = expected_attrs(raw, httpd.url)
        got = t.as_dict()
        for key, value in want.items():
            assert got.get(key) == value, (raw["name"], key)
        kind = want["TYPE"]
        arch, hyper = want["ARCHITECTURE"], want["HYPERVISOR"]
        if kind == "IMAGE":
            f = raw["files"][0]
            assert parse_template(decoded(t, "APPTEMPLATE64")).items == [
                ("DEV_PREFIX", f["dev_prefix"]),
                ("DRIVER", f["driver"]),
                ("TYPE", f["type"]),
            ]
            check_vm_template(decoded(t, "VMTEMPLATE64"), raw, arch, hyper)
            assert t.get_all("DISK") == [] and t.get_all("ROLE") == []
        elif kind == "VMTEMPLATE":
            check_vm_template(decoded(t, "APPTEMPLATE64"), raw, arch, hyper)
            disks = t.get_all("DISK")
            assert [d["APP"] for d in disks] == raw["disks"]
            for d in disks:
                assert len(d["NAME"]) == 10 and int(d["NAME"], 16) >= 0
            assert t.get("VMTEMPLATE64") is None and t.get("MD5") is None
        else:
            assert decoded(t, "APPTEMPLATE64") == raw["opennebula_template"]
            assert [(r["NAME"], r["APP"]) for r in t.get_all("ROLE")] == list(raw["roles"].items())


def test_official_endpoint_default_and_trailing_slashes(installation, httpd, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    sources = set()
    for endpoint in (httpd.url, httpd.url + "/", httpd.url + "//"):
        _, apps = parse_output(run(installation, endpoint))
        sources.add(apps[0].get("SOURCE"))
    assert sources == {f"{httpd.url}/appliance/{APPLIANCES[0]['_id']['$oid']}/download/0"}
    assert all(r.path == ROUTE for r in httpd.requests)
    assert opennebula.DEFAULT_ENDPOINT == "https://marketplace.opennebula.io/"


def test_stable_output_across_runs(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    httpd.validators = False
    first = run(installation, httpd.url).to_template()
    second = run(installation, httpd.url).to_template()
    assert first == second
    names = [t.get("NAME") for t in parse_output(run(installation, httpd.url))[1]]
    assert names == [a["name"] for a in APPLIANCES]


def test_version_and_edition_in_user_agent(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    (installation.remotes / "VERSION").write_text("7.0.1\n")
    (installation.remotes / "EDITION").write_text("EE\n")
    run(installation, httpd.url)
    (installation.remotes / "VERSION").unlink()
    (installation.remotes / "EDITION").write_text("bad edition with spaces\n")
    run(installation, httpd.url)
    agents = [r.headers["User-Agent"] for r in httpd.requests]
    assert agents == ["OpenNebula 7.0.1 EE (Market Driver)", "OpenNebula 7.0 (Market Driver)"]


# --------------------------------------------------------------------------- mapping variants


def variant(**changes: object) -> dict:
    raw = copy.deepcopy(APPLIANCES[0])
    raw.update(changes)
    return raw


def test_arch_and_hypervisor_mapping_and_aarch64_os(httpd, installation, log):
    tmpl = json.dumps({"OS": {"ARCH": "x86_64", "BOOT": "disk0"}, "SCHED_REQUIREMENTS": "ID>0"})
    cases = [
        variant(_id={"$oid": "a1"}, name="arm", **{"os-arch": "arm64", "hypervisor": "KVM"}),
        variant(_id={"$oid": "a2"}, name="amd", **{"os-arch": "amd64", "hypervisor": "ALL"}),
        variant(_id={"$oid": "a3"}, name="none", **{"os-arch": "", "hypervisor": ""}),
        variant(_id={"$oid": "a4"}, name="lxc", **{"os-arch": "aarch64", "hypervisor": "LXC"}),
        variant(_id={"$oid": "a5"}, name="own", opennebula_template=tmpl, **{"os-arch": "arm64"}),
    ]
    del cases[2]["hypervisor"]
    httpd.routes[ROUTE] = catalog_bytes(cases)
    _, apps = parse_output(run(installation, httpd.url))
    got = {t.get("NAME"): t for t in apps}
    assert [(t.get("ARCHITECTURE"), t.get("HYPERVISOR")) for t in apps] == [
        ("aarch64", "kvm"),
        ("x86_64", "kvm"),
        ("all", "kvm"),
        ("aarch64", "lxc"),
        ("aarch64", "kvm"),
    ]
    aarch64_os = {
        "ARCH": "aarch64",
        "FIRMWARE": "/usr/share/AAVMF/AAVMF_CODE.fd",
        "FIRMWARE_SECURE": "no",
        "MACHINE": "virt",
    }
    arm = parse_template(decoded(got["arm"], "VMTEMPLATE64"))
    assert arm.get_all("OS") == [aarch64_os]
    assert arm.get("SCHED_REQUIREMENTS") == 'HYPERVISOR="kvm" & ARCH="aarch64"'
    amd = parse_template(decoded(got["amd"], "VMTEMPLATE64"))
    assert amd.get_all("OS") == [{"ARCH": "x86_64"}]
    assert amd.get("SCHED_REQUIREMENTS") == 'HYPERVISOR="kvm" & ARCH="x86_64"'
    none = parse_template(decoded(got["none"], "VMTEMPLATE64"))
    assert none.get("SCHED_REQUIREMENTS") == 'HYPERVISOR="kvm"'
    lxc = parse_template(decoded(got["lxc"], "VMTEMPLATE64"))
    assert lxc.get("SCHED_REQUIREMENTS") == 'HYPERVISOR="lxc" & ARCH="aarch64"'
    own = parse_template(decoded(got["own"], "VMTEMPLATE64"))
    assert own.get_all("OS") == [{"BOOT": "disk0", **aarch64_os}]
    assert own.get("SCHED_REQUIREMENTS") == '(ID>0) & HYPERVISOR="kvm" & ARCH="aarch64"'


def test_size_rounds_up_and_md5_from_checksum(httpd, installation, log):
    f = APPLIANCES[0]["files"][0]
    exact = {**f, "size": 2 * 2**20}
    plus = {**f, "size": 2 * 2**20 + 1}
    zero = {**f, "size": 0}
    text = {**f, "size": "1048577"}
    only_checksum = {k: v for k, v in f.items() if k != "md5"}
    cases = [
        variant(_id={"$oid": f"s{i}"}, name=f"s{i}", files=[x])
        for i, x in enumerate([exact, plus, zero, text, only_checksum])
    ]
    httpd.routes[ROUTE] = catalog_bytes(cases)
    _, apps = parse_output(run(installation, httpd.url))
    assert [t.get("SIZE") for t in apps] == ["2", "3", "0", "2", str(math.ceil(f["size"] / 2**20))]
    assert apps[4].get("MD5") == f["checksum"]["md5"]


def test_filters(httpd, installation, log):
    cases = [
        variant(_id={"$oid": "f1"}, name="x86 kvm", **{"os-arch": "x86_64", "hypervisor": "KVM"}),
        variant(_id={"$oid": "f2"}, name="arm kvm", **{"os-arch": "arm64", "hypervisor": "KVM"}),
        variant(_id={"$oid": "f3"}, name="any arch", **{"os-arch": "", "hypervisor": "ALL"}),
        variant(_id={"$oid": "f4"}, name="x86 lxc", **{"os-arch": "amd64", "hypervisor": "LXC"}),
    ]
    httpd.routes[ROUTE] = catalog_bytes(cases)

    def names(**attrs: str) -> list[str]:
        return [t.get("NAME") for t in parse_output(run(installation, httpd.url, **attrs))[1]]

    assert names() == ["x86 kvm", "arm kvm", "any arch", "x86 lxc"]
    assert names(ARCHITECTURES="arm64") == ["arm kvm", "any arch"]
    assert names(ARCHITECTURES="x86_64, aarch64") == ["x86 kvm", "arm kvm", "any arch", "x86 lxc"]
    assert names(HYPERVISORS="lxc") == ["x86 lxc"]
    assert names(ARCHITECTURES="amd64", HYPERVISORS="KVM") == ["x86 kvm", "any arch"]
    log.truncate(0)
    assert names(ARCHITECTURES="ppc64le") == ["any arch"]
    assert names(HYPERVISORS="xen") == []
    assert any("no appliance published" in w for w in warns(log))
    with pytest.raises(ConfigError, match="ARCHITECTURES"):
        names(ARCHITECTURES='x86_64 "evil"')


# --------------------------------------------------------------------------- hostile entries


def hostile_catalog() -> tuple[list, list[str], list[str]]:
    """(appliances, names expected to be published, labels expected in WARN lines)."""
    good = [
        variant(
            _id={"$oid": "h1"},
            name='quote "name" \\',
            short_description='He said "hi" and left a backslash \\',
            version="1.0 ]]> 2",
            tags=['a"b', "c]]>d", "e\\"],
            publisher="x\ny\r\nz",
        ),
        variant(_id={"$oid": "h2"}, name="big", short_description="D" * 100_000),
        variant(_id={"$oid": "h3"}, name="cdata ]]> name", description="]]>" * 1000),
        variant(
            _id={"$oid": "h4"},
            name="hostile template",
            opennebula_template=json.dumps(
                {"CONTEXT": {"X": 'a"b]]>c\\'}, "bad key!": "v", "N": [{"A": "1"}]}
            ),
        ),
        variant(_id={"$oid": "h5"}, name="numeric version", version=7, creation_time="1747149743"),
        variant(_id={"$oid": "h6"}, name="no template", opennebula_template=None),
    ]
    bad = [
        ("missing _id", {k: v for k, v in variant(name="no id").items() if k != "_id"}),
        ("_id not object", variant(_id="abc", name="id string")),
        ("unsafe id", variant(_id={"$oid": "../../x"}, name="unsafe id")),
        ("no name", variant(_id={"$oid": "b1"}, name="")),
        ("name wrong type", variant(_id={"$oid": "b2"}, name=["x"])),
        ("tags wrong type", variant(_id={"$oid": "b3"}, name="tags", tags="a,b")),
        ("files wrong type", variant(_id={"$oid": "b4"}, name="files", files={"a": 1})),
        ("no files", variant(_id={"$oid": "b5"}, name="nofiles", files=[])),
        ("size wrong", variant(_id={"$oid": "b6"}, name="size", files=[{"size": "big"}])),
        ("bad md5", variant(_id={"$oid": "b7"}, name="md5", files=[{"size": 1, "md5": "zz"}])),
        ("bad template", variant(_id={"$oid": "b8"}, name="tmpl", opennebula_template="{nope")),
        ("template list", variant(_id={"$oid": "b9"}, name="tmpl2", opennebula_template="[1]")),
        ("unknown type", variant(_id={"$oid": "b10"}, name="type", type="CONTAINER")),
        ("publisher object", variant(_id={"$oid": "b11"}, name="pub", publisher={"a": 1})),
        ("creation_time bool", variant(_id={"$oid": "b12"}, name="ct", creation_time=True)),
        ("hypervisor quote", variant(_id={"$oid": "b13"}, name="hv", hypervisor='kvm" | 1')),
        (
            "disks wrong",
            {**variant(_id={"$oid": "b14"}, name="vmt"), "type": "VMTEMPLATE", "disks": [1]},
        ),
        (
            "roles wrong",
            {
                **variant(_id={"$oid": "b15"}, name="svc"),
                "type": "SERVICE_TEMPLATE",
                "roles": ["a"],
            },
        ),
        ("not an object", "just a string"),
        ("null", None),
        ("duplicate name", variant(_id={"$oid": "b16"}, name="big")),
    ]
    appliances = [*good[:3], *(b for _, b in bad), *good[3:]]
    return appliances, [g["name"] for g in good], [what for what, _ in bad]


def test_hostile_entries_never_break_output(httpd, installation, log):
    appliances, good_names, bad = hostile_catalog()
    httpd.routes[ROUTE] = catalog_bytes(appliances)
    result = run(installation, httpd.url)
    _, apps = parse_output(result)
    assert [t.get("NAME") for t in apps] == [
        n.replace("]]>", "]] >") + (" " if n.endswith("\\") else "") for n in good_names
    ]
    skipped = [w for w in warns(log) if w.startswith("WARN: skipping appliance #")]
    assert len(skipped) == len(bad)
    assert all("\n" not in w for w in skipped)
    by_name = {t.get("NAME"): t for t in apps}
    h1 = apps[0]
    assert h1.get("DESCRIPTION") == 'He said "hi" and left a backslash \\ '
    assert h1.get("VERSION") == "1.0 ]] > 2"
    assert h1.get("TAGS") == 'a"b, c]] >d, e\\ '
    assert h1.get("PUBLISHER") == "x\ny\r\nz"
    assert by_name["big"].get("DESCRIPTION") == "D" * 100_000
    vm = parse_template(decoded(by_name["hostile template"], "VMTEMPLATE64"))
    assert vm.get_all("CONTEXT") == [{"X": 'a"b]] >c\\ '}]
    assert vm.get_all("N") == [{"A": "1"}]
    assert any("bad key!" in w for w in warns(log))
    assert by_name["numeric version"].get("VERSION") == "7"
    assert by_name["numeric version"].get("REGTIME") == "1747149743"
    assert by_name["no template"].get("VMTEMPLATE64") is None
    for line in skipped:
        assert len(line) < 400


def test_skip_lines_name_the_appliance(httpd, installation, log):
    raw = variant(_id={"$oid": "b8"}, name="Broken\nTemplate", opennebula_template="{nope")
    httpd.routes[ROUTE] = catalog_bytes([APPLIANCES[0], raw])
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 1
    assert warns(log) == [
        "WARN: skipping appliance #1 'Broken; Template' (b8): opennebula_template is not valid JSON"
    ]


# --------------------------------------------------------------------------- server faults


def test_500_then_200_is_retried(httpd, installation, log):
    httpd.routes[ROUTE] = failing_then(CATALOG_BYTES, failures=2)
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 14
    assert httpd.count(ROUTE) == 3


def test_404_is_a_one_line_failure(httpd, installation, log):
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value) == f"{httpd.url}/appliance answered HTTP 404 Not Found"


def test_persistent_500_fails_after_bounded_retries(httpd, installation, log):
    httpd.routes[ROUTE] = failing_then(CATALOG_BYTES, failures=100)
    with pytest.raises(RemoteError, match=f"{httpd.url}/appliance"):
        run(installation, httpd.url)
    assert httpd.count(ROUTE) == web.RETRY_COUNT + 1


def test_timeout(httpd, installation, log, monkeypatch):
    monkeypatch.setattr(web, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(web, "RETRY_COUNT", 1)
    httpd.routes[ROUTE] = slow(2.0, CATALOG_BYTES)
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value) == f"cannot fetch {httpd.url}/appliance: timed out"


def test_unreachable_endpoint(installation, log):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError) as exc:
        run(installation, url)
    assert str(exc.value) == f"cannot fetch {url}/appliance: connection refused"


def test_truncated_transfer(httpd, installation, log):
    httpd.routes[ROUTE] = truncated(CATALOG_BYTES, keep=1000)
    with pytest.raises(RemoteError, match=f"{httpd.url}/appliance"):
        run(installation, httpd.url)


def test_truncated_json(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES[: len(CATALOG_BYTES) // 2]
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value) == f"{httpd.url}/appliance did not answer valid JSON (JSONDecodeError)"


def test_html_instead_of_json(httpd, installation, log):
    httpd.routes[ROUTE] = b"<html><body><h1>Maintenance</h1></body></html>"
    with pytest.raises(RemoteError, match="did not answer valid JSON"):
        run(installation, httpd.url)


@pytest.mark.parametrize(
    "body, cause",
    [
        (b"[]", "JSON list"),
        (b'"appliances"', "JSON str"),
        (b'{"sEcho": 1}', "no 'appliances' list"),
        (b'{"appliances": {"a": 1}}', "no 'appliances' list"),
    ],
)
def test_json_of_another_shape(httpd, installation, log, body, cause):
    httpd.routes[ROUTE] = body
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value) == f"{httpd.url}/appliance did not answer an appliance catalog ({cause})"


def test_redirect_is_followed(httpd, installation, log):
    def moved(h: BaseHTTPRequestHandler) -> None:
        h.send_response(301)
        h.send_header("Location", "/v2/appliance")
        h.send_header("Content-Length", "0")
        h.end_headers()

    httpd.routes[ROUTE] = moved
    httpd.routes["/v2/appliance"] = CATALOG_BYTES
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 14
    assert apps[0].get("SOURCE", "").startswith(f"{httpd.url}/appliance/")


def test_304_reuses_the_cached_catalog(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    first = run(installation, httpd.url).to_template()
    log.truncate(0)
    second = run(installation, httpd.url).to_template()
    assert first == second
    assert "unchanged, cached copy" in log.getvalue()
    again = httpd.requests[1].headers
    assert again.get("If-None-Match") and again.get("If-Modified-Since")
    assert "If-None-Match" not in httpd.requests[0].headers
    cached = list(installation.cache_dir.iterdir())
    assert len(cached) == 1 and not cached[0].name.startswith(".tmp")


def test_http_proxy_from_the_environment(httpd, installation, log, monkeypatch):
    """The MAD's -p sets http_proxy; the loopback server plays the proxy (absolute-URI path)."""
    endpoint = "http://catalog.example"
    httpd.routes[f"{endpoint}/appliance"] = CATALOG_BYTES
    monkeypatch.setenv("http_proxy", httpd.url)
    _, apps = parse_output(run(installation, endpoint))
    assert len(apps) == 14
    assert httpd.requests[0].path == f"{endpoint}/appliance"
    assert apps[0].get("SOURCE", "").startswith(f"{endpoint}/appliance/")


def test_gzip_answer(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    run(installation, httpd.url)
    assert "gzip" in httpd.requests[0].headers.get("Accept-Encoding", "")


def test_bad_endpoint_and_unsupported_actions(installation, log):
    for endpoint in ("ftp://example.org/", "not a url", "http://"):
        with pytest.raises(ConfigError, match="ENDPOINT"):
            run(installation, endpoint)
    backend = OpenNebulaCatalog(market("http://127.0.0.1:1"), Context(installation))
    with pytest.raises(NotSupportedError):
        backend.delete_app(App(id=1, name="x"))


# --------------------------------------------------------------------------- end to end


def action_payload(endpoint: str) -> str:
    xml = (
        "<MARKET_DRIVER_ACTION_DATA><MARKETPLACE><ID>0</ID><NAME>OpenNebula Public</NAME>"
        "<MARKET_MAD>one</MARKET_MAD><TEMPLATE>"
        f"<ENDPOINT><![CDATA[{endpoint}]]></ENDPOINT><MARKET_MAD>one</MARKET_MAD>"
        "</TEMPLATE></MARKETPLACE></MARKET_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(xml.encode()).decode()


def run_script(endpoint: str, one_location: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["ONE_LOCATION"] = str(one_location)
    return subprocess.run(
        [sys.executable, "remotes/market/one/monitor", action_payload(endpoint), "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_action_script_end_to_end(httpd, tmp_path):
    (tmp_path / "var" / "remotes").mkdir(parents=True)
    (tmp_path / "var" / "remotes" / "VERSION").write_text("7.0.0\n")
    httpd.routes[ROUTE] = CATALOG_BYTES
    proc = run_script(httpd.url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    outer = parse_template(proc.stdout)
    assert outer.names()[:3] == ["USED_MB", "FREE_MB", "TOTAL_MB"]
    apps = [parse_template(base64.b64decode(v)) for v in outer.get_all("APP")]
    assert [t.get("NAME") for t in apps] == [a["name"] for a in APPLIANCES]
    assert httpd.requests[0].headers["User-Agent"] == "OpenNebula 7.0.0 (Market Driver)"
    assert proc.stderr.decode().startswith("INFO: 14 of 14 appliances published")
    assert list((tmp_path / "var" / "cache" / "market").iterdir())

    httpd.routes.pop(ROUTE)
    proc = run_script(httpd.url, tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert proc.stderr.decode() == f"{httpd.url}/appliance answered HTTP 404 Not Found\n"


# --------------------------------------------------------------------------- property tests

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["]]>", "\\", '"', "\n", "\x00", "arm64", "ALL", "{}", "[1]", "IMAGE"]),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = [
    "_id",
    "name",
    "version",
    "publisher",
    "short_description",
    "tags",
    "format",
    "creation_time",
    "os-arch",
    "hypervisor",
    "opennebula_template",
    "type",
    "files",
    "disks",
    "roles",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 13), st.sampled_from(FIELDS), json_any), max_size=6))
def test_any_mutation_of_the_catalog_never_breaks_the_output(mutations):
    appliances = copy.deepcopy(APPLIANCES)
    for index, field_name, value in mutations:
        appliances[index][field_name] = value
    buf = io.StringIO()
    saved, driverlog.stream = driverlog.stream, buf
    try:
        apps, skipped, _ = opennebula.build_apps(appliances, "http://127.0.0.1:1")
    finally:
        driverlog.stream = saved
    result = MonitorResult(0, 0, 0, apps)
    _, parsed = parse_output(result)
    for t in parsed:
        for name in ("APPTEMPLATE64", "VMTEMPLATE64"):
            if t.get(name) and t.get("TYPE") != "SERVICE_TEMPLATE":
                parse_template(decoded(t, name))
    assert len(parsed) + skipped == len(appliances)
    assert len([ln for ln in buf.getvalue().splitlines() if "skipping" in ln]) == skipped


def test_skip_warnings_are_capped(log):
    broken = [{"name": f"n{i}"} for i in range(opennebula.MAX_SKIP_WARNINGS + 7)]
    apps, skipped, _ = opennebula.build_apps(broken, "http://127.0.0.1:1")
    assert apps == [] and skipped == len(broken)
    lines = warns(log)
    assert len(lines) == opennebula.MAX_SKIP_WARNINGS + 1
    assert lines[-1] == "WARN: 7 more appliances skipped (not listed)"
