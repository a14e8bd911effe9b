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
from tests.servers.httpd import failing_then, slow, truncated

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


STOCK = json.loads((REPO / "tests" / "data" / "stock-one" / "expected.json").read_text())
"""What the stock monitors print, per catalog and release (its ``about`` says how it was read)."""
STOCK_ENDPOINT = STOCK["endpoint"]
DELIBERATE_ADDITIONS = {
    # 6.10's template_to_str has no Array case (6.10:225-244): it drops a list of NICs; ours
    # writes them as 7.0 does (7.0:250-267), an addition where stock set nothing.
    ("stock-one/variants.json", "6.10.0.1", "NIC list"): {"VMTEMPLATE64": {"NIC"}},
}


def app_fields(t: Template) -> dict:
    """One published APP in the format of tests/data/stock-one/expected.json."""
    entry: dict = {"attrs": {}, "DISK": [], "ROLE": []}
    for name, value in t.items:
        if name in ("APPTEMPLATE64", "VMTEMPLATE64"):
            text = base64.b64decode(value, validate=True).decode()
            if t.get("TYPE") == "SERVICE_TEMPLATE":
                entry[name] = text
            else:
                entry[name] = [[n, v] for n, v in parse_template(text).items]
        elif name == "DISK":
            assert isinstance(value, dict) and len(value["NAME"]) == 10
            int(value["NAME"], 16)
            entry["DISK"].append(value["APP"])
        elif name == "ROLE":
            entry["ROLE"].append(value)
        else:
            assert isinstance(value, str) and name not in entry["attrs"], name
            entry["attrs"][name] = value
    return entry


def rebased(value: object, url: str) -> object:
    """``value`` with the ENDPOINT of the stock run replaced by this test's server."""
    if isinstance(value, str):
        return value.replace(STOCK_ENDPOINT, url)
    if isinstance(value, list):
        return [rebased(v, url) for v in value]
    if isinstance(value, dict):
        return {k: rebased(v, url) for k, v in value.items()}
    return value


def compare_with_stock(catalog: str, release: str, apps: list[Template], url: str) -> None:
    """Field by field: what oned keeps of stock's output (the last APP of each NAME, at the
    first one's place, MarketPlaceAppPool::import) against ours."""
    stock: dict[str, dict] = {}
    for entry in rebased(STOCK["catalogs"][catalog][release], url):
        stock[entry["attrs"]["NAME"]] = entry  # dict order: first place, last content
    ours = {t.get("NAME"): app_fields(t) for t in apps}
    assert list(ours) == list(stock), "same NAME set, in the same order"
    for name, want in stock.items():
        got = ours[name]
        assert got["attrs"] == want["attrs"], name
        assert (got["DISK"], got["ROLE"]) == (want["DISK"], want["ROLE"]), name
        allowed = DELIBERATE_ADDITIONS.get((catalog, release, name), {})
        for nested in ("APPTEMPLATE64", "VMTEMPLATE64"):
            mine, theirs = got.get(nested), want.get(nested)
            if isinstance(theirs, str) or theirs is None:
                assert mine == theirs, (name, nested)
                continue
            assert mine is not None, (name, nested)
            missing = [item for item in theirs if item not in mine]
            assert missing == [], (name, nested, "stock attributes missing or changed")
            extra = {n for n, v in mine if [n, v] not in theirs}
            assert extra == allowed.get(nested, set()), (name, nested, "additions")


# --------------------------------------------------------------------------- the catalog


@pytest.mark.parametrize("release", ["7.5.80", "6.10.0.1"])
@pytest.mark.parametrize("catalog", ["one-community-appliance.json", "stock-one/variants.json"])
def test_stock_output_field_by_field(httpd, installation, log, catalog, release):
    """Against what the stock monitor of the release prints (tests/data/stock-one): the same
    NAMEs, every single attribute, DISK APPs, ROLEs and every attribute of APPTEMPLATE64 and
    VMTEMPLATE64 (rules and their upstream lines: module docstring of catalogs/opennebula)."""
    httpd.routes[ROUTE] = (REPO / "tests" / "data" / catalog).read_bytes()
    (installation.remotes / "VERSION").write_text(f"{release}\n")
    result = run(installation, httpd.url)
    outer, apps = parse_output(result)
    assert (outer.get("USED_MB"), outer.get("FREE_MB"), outer.get("TOTAL_MB")) == ("0", "0", "0")
    compare_with_stock(catalog, release, apps, httpd.url)
    assert httpd.requests[0].headers["User-Agent"] == f"OpenNebula {release} (Market Driver)"
    assert [r.path for r in httpd.requests] == [ROUTE]
    if catalog == "one-community-appliance.json":
        assert len(apps) == len(APPLIANCES) == 14
        assert {t.get("TYPE") for t in apps} == {"IMAGE", "VMTEMPLATE", "SERVICE_TEMPLATE"}
        lines = warns(log)
        assert lines == ([] if release.startswith("7") else [SLASH_WARNING])


SLASH_WARNING = (
    "WARN: ENDPOINT does not end with '/': like the stock driver of OpenNebula 6.10, the apps'"
    " SOURCE and LINK join it to 'appliance/<id>' as written and are not usable URLs"
    " (OpenNebula bug #6619, fixed in 7.0); add the final '/'"
)


def test_release_follows_remotes_version(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES
    oid = APPLIANCES[0]["_id"]["$oid"]
    sources = {}
    for version in ("6.10.0.1", "6.10.3", "7.0.0", "7.2.1", "7.5.80"):
        (installation.remotes / "VERSION").write_text(version + "\n")
        _, apps = parse_output(run(installation, httpd.url + "/"))
        sources[version] = (apps[0].get("SOURCE"), apps[0].get("ARCHITECTURE"))
    for version, (source, arch) in sources.items():
        assert source == f"{httpd.url}/appliance/{oid}/download/0"
        assert arch == (None if version.startswith("6.") else "x86_64")
    assert warns(log) == []  # the final '/' is there: no 6.10 warning


def test_official_endpoint_default_and_trailing_slashes(installation, httpd, log):
    """7.x: SOURCE is ENDPOINT as written, with a '/' added when missing (7.0:67,178-179)."""
    httpd.routes[ROUTE] = CATALOG_BYTES
    oid = APPLIANCES[0]["_id"]["$oid"]
    sources = []
    for endpoint in (httpd.url, httpd.url + "/", httpd.url + "//"):
        _, apps = parse_output(run(installation, endpoint))
        sources.append(apps[0].get("SOURCE"))
    assert sources == [
        f"{httpd.url}/appliance/{oid}/download/0",
        f"{httpd.url}/appliance/{oid}/download/0",
        f"{httpd.url}//appliance/{oid}/download/0",
    ]
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


def test_placement_rules_of_7x(httpd, installation, log):
    """7.0:282-303 and 313-332, written out: only aarch64 gets an ARCH clause, the appliance's
    own requirements come first, unquoted, and HYPERVISOR is set in the template."""
    tmpl = json.dumps({"OS": {"ARCH": "x86_64", "BOOT": "disk0"}, "SCHED_REQUIREMENTS": "ID>0"})
    cases = [
        variant(_id={"$oid": "a1"}, name="arm", **{"os-arch": "arm64", "hypervisor": "KVM"}),
        variant(_id={"$oid": "a2"}, name="amd", **{"os-arch": "amd64", "hypervisor": "ALL"}),
        variant(_id={"$oid": "a3"}, name="none", **{"os-arch": "", "hypervisor": ""}),
        variant(_id={"$oid": "a4"}, name="lxc", **{"os-arch": "aarch64", "hypervisor": "LXC"}),
        variant(_id={"$oid": "a5"}, name="own", opennebula_template=tmpl, **{"os-arch": "arm64"}),
        variant(
            _id={"$oid": "a6"},
            name="blank own",
            opennebula_template='{"CPU": "1", "sched_requirements": " "}',
            **{"os-arch": "x86_64", "hypervisor": "all"},
        ),
    ]
    httpd.routes[ROUTE] = catalog_bytes(cases)
    _, apps = parse_output(run(installation, httpd.url))
    got = {t.get("NAME"): parse_template(decoded(t, "VMTEMPLATE64")) for t in apps}
    assert [(t.get("ARCHITECTURE"), t.get("HYPERVISOR")) for t in apps] == [
        ("aarch64", "kvm"),
        ("x86_64", "kvm"),
        ("all", "kvm"),
        ("aarch64", "lxc"),
        ("aarch64", "kvm"),
        ("x86_64", "all"),  # only "ALL" means kvm (7.0:316)
    ]
    requirements = {name: t.get("SCHED_REQUIREMENTS") for name, t in got.items()}
    assert requirements == {
        "arm": "HYPERVISOR=kvm & ARCH=aarch64",
        "amd": "HYPERVISOR=kvm",
        "none": "HYPERVISOR=kvm",
        "lxc": "HYPERVISOR=lxc & ARCH=aarch64",
        "own": "ID>0 & HYPERVISOR=kvm & ARCH=aarch64",
        "blank own": "HYPERVISOR=all",  # stock: " & HYPERVISOR=all", not an expression
    }
    assert {name: t.get("HYPERVISOR") for name, t in got.items()} == {
        "arm": "kvm",
        "amd": "kvm",
        "none": "kvm",
        "lxc": "lxc",
        "own": "kvm",
        "blank own": "all",
    }
    aarch64_os = dict(opennebula.AARCH64_OS)
    assert got["arm"].get_all("OS") == [aarch64_os]
    assert got["amd"].get_all("OS") == [{"ARCH": "x86_64"}]
    assert got["own"].get_all("OS") == [{"ARCH": "aarch64", "BOOT": "disk0", **aarch64_os}]
    assert got["blank own"].names() == ["CPU", "SCHED_REQUIREMENTS", "HYPERVISOR"]


def test_6_10_rules(httpd, installation, log):
    """6.10: no ARCHITECTURE/HYPERVISOR, the catalog's template unchanged (6.10:179-191,
    225-244), ENDPOINT joined as written (6.10:170) with a WARN when that breaks the URLs."""
    (installation.remotes / "VERSION").write_text("6.10.0\n")
    raw = variant(_id={"$oid": "x1"}, name="arm", **{"os-arch": "arm64", "hypervisor": "XEN?"})
    httpd.routes[ROUTE] = catalog_bytes([raw])
    _, apps = parse_output(run(installation, httpd.url))
    (t,) = apps
    assert t.get("ARCHITECTURE") is None and t.get("HYPERVISOR") is None
    assert t.get("SOURCE") == f"{httpd.url}appliance/x1/download/0"
    vm = parse_template(decoded(t, "VMTEMPLATE64"))
    assert "SCHED_REQUIREMENTS" not in vm.names() and "HYPERVISOR" not in vm.names()
    assert warns(log) == [SLASH_WARNING]
    log.truncate(0)
    log.seek(0)
    _, apps = parse_output(run(installation, httpd.url + "/", ARCHITECTURES="aarch64"))
    assert apps[0].get("SOURCE") == f"{httpd.url}/appliance/x1/download/0"
    assert warns(log) == []


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


def test_placement_is_read_once_per_appliance(monkeypatch) -> None:
    """The filter and the APP share one reading of os-arch and hypervisor."""
    read, real = [], opennebula._placement
    monkeypatch.setattr(
        opennebula, "_placement", lambda raw, rules: read.append(1) or real(raw, rules)
    )
    cases = [
        variant(_id={"$oid": f"p{i}"}, name=f"app {i}", **{"os-arch": arch, "hypervisor": "KVM"})
        for i, arch in enumerate(("x86_64", "arm64", "x86_64"))
    ]
    flt = opennebula.CatalogFilter.from_attrs("x86_64", None)
    apps, skipped, filtered = opennebula.build_apps(cases, "http://127.0.0.1:9/", flt)
    assert ([a.name for a in apps], skipped, filtered) == (["app 0", "app 2"], 0, 1)
    assert len(read) == 3


# --------------------------------------------------------------------------- hostile entries


def hostile_catalog() -> tuple[list, list[str], list[str]]:
    """(appliances, names expected to be published, labels expected in skip WARN lines)."""
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
        # published as stock publishes them (6.10:82-111), without what cannot be read
        variant(_id={"$oid": "h7"}, name="no files", files=[]),
        variant(_id={"$oid": "h8"}, name="files object", files={"a": 1}),
        variant(_id={"$oid": "h9"}, name="size word", files=[{"size": "big"}]),
        variant(_id={"$oid": "h10"}, name="bad md5", files=[{"size": 1, "md5": "zz"}]),
        variant(_id={"$oid": "h11"}, name="bad template", opennebula_template="{nope"),
        variant(_id={"$oid": "h12"}, name="template list", opennebula_template="[1]"),
    ]
    bad = [
        ("missing _id", {k: v for k, v in variant(name="no id").items() if k != "_id"}),
        ("_id not object", variant(_id="abc", name="id string")),
        ("unsafe id", variant(_id={"$oid": "../../x"}, name="unsafe id")),
        ("no name", variant(_id={"$oid": "b1"}, name="")),
        ("name wrong type", variant(_id={"$oid": "b2"}, name=["x"])),
        ("tags wrong type", variant(_id={"$oid": "b3"}, name="tags", tags="a,b")),
        ("unknown type", variant(_id={"$oid": "b10"}, name="type", type="CONTAINER")),
        ("publisher object", variant(_id={"$oid": "b11"}, name="pub", publisher={"a": 1})),
        ("creation_time bool", variant(_id={"$oid": "b12"}, name="ct", creation_time=True)),
        ("hypervisor quote", variant(_id={"$oid": "b13"}, name="hv", hypervisor='kvm" | 1')),
        ("arch injection", variant(_id={"$oid": "b17"}, name="ar", **{"os-arch": "x | ID>0"})),
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
    ]
    appliances = [*good[:3], *(b for _, b in bad), *good[3:]]
    return appliances, [g["name"] for g in good], [what for what, _ in bad]


def test_hostile_entries_never_break_output(httpd, installation, log, monkeypatch):
    monkeypatch.setattr(opennebula, "MAX_SKIP_WARNINGS", 100)
    appliances, good_names, bad = hostile_catalog()
    duplicate = variant(
        _id={"$oid": "h13"}, name="big", short_description="D" * 100_000, version="the last one"
    )
    httpd.routes[ROUTE] = catalog_bytes([*appliances, duplicate])
    result = run(installation, httpd.url)
    _, apps = parse_output(result)
    assert [t.get("NAME") for t in apps] == [
        n.replace("]]>", "]] >") + (" " if n.endswith("\\") else "") for n in good_names
    ]
    lines = warns(log)
    skipped = [w for w in lines if w.startswith("WARN: skipping appliance #")]
    assert len(skipped) == len(bad)
    by_name = {t.get("NAME"): t for t in apps}
    h1 = apps[0]
    assert h1.get("DESCRIPTION") == 'He said "hi" and left a backslash \\ '
    assert h1.get("VERSION") == "1.0 ]] > 2"
    assert h1.get("TAGS") == 'a"b, c]] >d, e\\ '
    assert h1.get("PUBLISHER") == "x\ny\r\nz"
    assert by_name["big"].get("DESCRIPTION") == "D" * 100_000
    assert by_name["big"].get("VERSION") == "the last one"  # what oned keeps of stock's two
    assert apps[1] is by_name["big"]  # at the first one's place
    vm = parse_template(decoded(by_name["hostile template"], "VMTEMPLATE64"))
    assert vm.get_all("CONTEXT") == [{"X": 'a"b]] >c\\ '}]
    assert vm.get_all("N") == [{"A": "1"}]
    assert any("bad key!" in w for w in lines)
    assert by_name["numeric version"].get("VERSION") == "7"
    assert by_name["numeric version"].get("REGTIME") == "1747149743"
    assert by_name["no template"].get("VMTEMPLATE64") is None
    for name in ("no files", "files object"):
        t = by_name[name]
        assert (t.get("SIZE"), t.get("MD5"), t.get("VMTEMPLATE64")) == (None, None, None), name
    assert by_name["size word"].get("SIZE") == "0"
    assert by_name["bad md5"].get("MD5") is None and by_name["bad md5"].get("SIZE") == "1"
    for name in ("bad template", "template list"):
        assert by_name[name].get("VMTEMPLATE64") is None, name
    assert any("'bad md5' (h10): files[0].md5 is not an MD5" in w for w in lines)
    assert any("'bad template' (h11): opennebula_template is not valid JSON" in w for w in lines)
    for line in lines:
        assert len(line) < 400


def test_hostile_template_key_cannot_forge_log_lines(httpd, installation, log):
    """A template key with a newline reaches a WARN line (members left out) as one line."""
    forged = "x\nLOG E 777 pwned\r\nERROR: forged"
    raw = variant(
        _id={"$oid": "f1"},
        name="forger\nLOG E 1 name",
        opennebula_template=json.dumps({forged: "v", "CPU": "1", "CONTEXT": {forged: "w"}}),
    )
    httpd.routes[ROUTE] = catalog_bytes([raw, {"name": "no id\nLOG E 2 label", "_id": 1}])
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 1
    lines = log.getvalue().splitlines()
    assert all(line.startswith(("INFO: ", "WARN: ")) for line in lines), lines
    assert not any("LOG E" in line.split(": ", 1)[1][:6] for line in lines)
    (dropped,) = [w for w in lines if "left out" in w]
    assert "x; LOG E 777 pwned; ERROR: forged, CONTEXT.x; LOG E 777" in dropped


def test_skip_lines_name_the_appliance(httpd, installation, log):
    raw = variant(_id={"$oid": "b8"}, name="Broken\nTags", tags="not a list")
    httpd.routes[ROUTE] = catalog_bytes([APPLIANCES[0], raw])
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 1
    assert warns(log) == [
        "WARN: skipping appliance #1 'Broken; Tags' (b8): tags is not a list of words"
    ]


def test_a_size_of_thousands_of_digits_skips_only_its_appliance(httpd, installation, log):
    """int() refuses 4,300 digits: a JSON size that long once failed the whole catalog."""
    huge = "9" * 5000

    def sized(oid: str, size: object) -> dict:
        raw = variant(_id={"$oid": oid}, name=f"sized {oid}")
        raw["files"] = [{**raw["files"][0], "size": size}]
        return raw

    entries = [APPLIANCES[0], sized("n1", "HUGE"), sized("s1", huge), sized("f1", "1e999")]
    body = catalog_bytes(entries).replace(b'"HUGE"', huge.encode())
    httpd.routes[ROUTE] = body
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 1
    assert warns(log) == [
        "WARN: skipping appliance #1 'sized n1' (n1): files[0].size is not a finite number",
        "WARN: skipping appliance #2 'sized s1' (s1): files[0].size "
        "'999999999999999999999999'... (5000 chars) has more than 30 digits",
        "WARN: skipping appliance #3 'sized f1' (f1): files[0].size '1e999' is not a finite number",
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
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': {httpd.url}/appliance answered HTTP 404 Not Found"
    )


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
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': cannot fetch {httpd.url}/appliance: timed out"
    )


def test_unreachable_endpoint(installation, log):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError) as exc:
        run(installation, url)
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': cannot fetch {url}/appliance: connection refused"
    )


def test_truncated_transfer(httpd, installation, log):
    httpd.routes[ROUTE] = truncated(CATALOG_BYTES, keep=1000)
    with pytest.raises(RemoteError, match=f"{httpd.url}/appliance"):
        run(installation, httpd.url)


def test_truncated_json(httpd, installation, log):
    httpd.routes[ROUTE] = CATALOG_BYTES[: len(CATALOG_BYTES) // 2]
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': {httpd.url}/appliance did not answer valid JSON"
        " (JSONDecodeError)"
    )


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
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': {httpd.url}/appliance did not answer an appliance"
        f" catalog ({cause})"
    )


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


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://u:s3cr3t-pw@[::1/", "unbalanced '[' or ']' around an IPv6 address"),
        (f"http://u:s3cr3t-pw@h:{'9' * 5000}/", "its port is not a number from 0 to 65535"),
    ],
)
def test_a_malformed_endpoint_is_a_config_error_without_it(installation, log, endpoint, reason):
    """urllib's ValueError used to end the monitor as 'internal error ...: Invalid IPv6 URL'."""
    with pytest.raises(ConfigError) as exc:
        run(installation, endpoint)
    assert str(exc.value) == f"ENDPOINT is not a valid URL ({reason})"


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
    assert proc.stderr.decode() == (
        f"marketplace 'OpenNebula Public': {httpd.url}/appliance answered HTTP 404 Not Found\n"
    )


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
    lines = buf.getvalue().splitlines()
    assert len([ln for ln in lines if "skipping" in ln or "replaces an earlier" in ln]) == skipped


def test_skip_warnings_are_capped(log):
    broken = [{"name": f"n{i}"} for i in range(opennebula.MAX_SKIP_WARNINGS + 7)]
    apps, skipped, _ = opennebula.build_apps(broken, "http://127.0.0.1:1")
    assert apps == [] and skipped == len(broken)
    lines = warns(log)
    assert len(lines) == opennebula.MAX_SKIP_WARNINGS + 1
    assert lines[-1] == (
        f"WARN: 7 more warnings about appliances not listed ({len(broken)} appliances skipped"
        " in all)"
    )


# --------------------------------------------------------------------------- hostile catalogs


def test_one_invalid_utf8_byte_costs_one_character(httpd, installation, log):
    name = APPLIANCES[0]["name"].encode()
    assert CATALOG_BYTES.count(b'"name":"' + name + b'"') == 1
    body = CATALOG_BYTES.replace(b'"name":"' + name + b'"', b'"name":"' + name + b'\xff"')
    httpd.routes[ROUTE] = body
    _, apps = parse_output(run(installation, httpd.url))
    assert len(apps) == 14
    assert apps[0].get("NAME") == APPLIANCES[0]["name"] + "\ufffd"


def test_entry_count_is_capped_and_skips_are_summed_up(httpd, installation, log):
    entries = opennebula.MAX_APPLIANCES * 4
    httpd.routes[ROUTE] = b'{"appliances":[' + b",".join([b"{}"] * entries) + b"]}"
    result = run(installation, httpd.url)
    assert result.apps == []
    lines = log.getvalue().splitlines()
    assert len(lines) <= opennebula.MAX_SKIP_WARNINGS + 4
    assert f"WARN: the catalog lists {entries} appliances: only the first" in log.getvalue()
    assert f"0 of {entries} appliances published" in log.getvalue()
    assert f"{entries} skipped" in log.getvalue()


def test_catalog_of_millions_of_values_is_refused_before_parsing(httpd, installation, log):
    """``{"appliances":[{},{},...]}``: 40 M entries cost a monitor 3 GB; the value bound refuses
    such a document on a count of bytes, before json.loads builds anything."""
    entries = opennebula.CATALOG_MAX_JSON_VALUES // 2 + 1
    httpd.routes[ROUTE] = b'{"appliances":[' + b",".join([b"{}"] * entries) + b"]}"
    with pytest.raises(RemoteError) as exc:
        run(installation, httpd.url)
    assert str(exc.value).startswith("marketplace 'OpenNebula Public': ")
    assert f"more than {opennebula.CATALOG_MAX_JSON_VALUES} values" in str(exc.value)
    httpd.routes[ROUTE] = b" " * (opennebula.CATALOG_MAX_BODY_BYTES + 1)
    with pytest.raises(RemoteError, match=f"more than {opennebula.CATALOG_MAX_BODY_BYTES} bytes"):
        run(installation, httpd.url)


def test_endpoint_credentials_only_in_source(httpd, installation, log):
    """ENDPOINT=http://user:secret@host/: the password reaches the server and SOURCE (a
    download needs it), not LINK, any other field, the cache or the log."""
    secret = "s3cr3t-pass"
    httpd.routes[ROUTE] = CATALOG_BYTES
    endpoint = httpd.url.replace("http://", f"http://user:{secret}@") + "/"
    _, apps = parse_output(run(installation, endpoint))
    assert httpd.requests[0].headers["Authorization"].startswith("Basic ")
    oid = APPLIANCES[0]["_id"]["$oid"]
    assert apps[0].get("SOURCE") == f"{endpoint}appliance/{oid}/download/0"
    assert apps[0].get("LINK") == f"{httpd.url}/appliance/{oid}"
    for t in apps:
        fields = {n: v for n, v in t.items if n != "SOURCE"}
        assert secret not in json.dumps(fields), t.get("NAME")
        for nested in ("APPTEMPLATE64", "VMTEMPLATE64"):
            if t.get(nested):
                assert secret not in decoded(t, nested)
    cached = list(installation.cache_dir.iterdir())
    assert cached
    for path in cached:
        assert secret not in path.name and secret.encode() not in path.read_bytes()
    assert secret not in log.getvalue()


def test_failed_fetch_is_one_line_naming_the_market(installation, monkeypatch):
    """No ``Retrying (...)`` WARN per retry: one failure line, after the retries."""
    import logging

    monkeypatch.setattr(web, "RETRY_BACKOFF_S", 0.0)
    out = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", out)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("urllib3").level)
    url = f"http://127.0.0.1:{free_port()}"
    try:
        driverlog.route_std_logging()
        with pytest.raises(RemoteError) as exc:
            run(installation, url)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("urllib3").setLevel(saved[2])
    assert out.getvalue() == ""
    assert str(exc.value) == (
        f"marketplace 'OpenNebula Public': cannot fetch {url}/appliance: connection refused"
    )
