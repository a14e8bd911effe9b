"""The backend interface: typed results rendered through the template writer, and the registry."""

from __future__ import annotations

import base64

import pytest
from onemarket import registry
from onemarket.action import App, Market
from onemarket.backends.base import (
    AppEntry,
    Backend,
    Context,
    ImportRequest,
    ImportResult,
    MonitorResult,
)
from onemarket.errors import NotSupportedError
from onemarket.installation import Installation
from onemarket.template import parse_template

HOSTILE = 'quote " backslash \\ cdata ]]> nul \x00 cr \r nl \n end\\'
SANITISED = 'quote " backslash \\ cdata ]] > nul  cr \r nl \n end\\ '


def test_import_result_template() -> None:
    text = ImportResult("http://m/1", "a" * 32, 12, "qcow2", sha256="b" * 64).to_template()
    assert parse_template(text).items == [
        ("SOURCE", "http://m/1"),
        ("MD5", "a" * 32),
        ("SIZE", "12"),
        ("FORMAT", "qcow2"),
    ]
    assert parse_template(ImportResult("s", "m", 0, "").to_template()).get("FORMAT") == "raw"


def _decode_app(line_value: str) -> str:
    return base64.b64decode(line_value).decode("utf-8")


def test_app_entry_round_trips_hostile_catalog_text() -> None:
    entry = AppEntry(
        name="Ubuntu 24.04",
        source="https://cat/ubuntu.qcow2",
        import_id="abc",
        publisher="Pub",
        format="qcow2",
        description=HOSTILE,
        version="1.0",
        tags="a,b",
        regtime=1_700_000_000,
        link="https://cat/ubuntu",
        size_mb=2252,
        md5="c" * 32,
        architecture="x86_64",
        hypervisor="KVM",
        apptemplate64=base64.b64encode(b'DEV_PREFIX = "vd"\n').decode(),
        vmtemplate64=base64.b64encode(b'CPU = "1"\n').decode(),
    )
    tmpl = parse_template(entry.to_template())
    assert tmpl.get("DESCRIPTION") == SANITISED
    assert tmpl.get("ORIGIN_ID") == "-1" and tmpl.get("TYPE") == "IMAGE"
    assert tmpl.get("REGTIME") == "1700000000" and tmpl.get("SIZE") == "2252"
    assert tmpl.names()[0] == "NAME"
    assert parse_template(_decode_app(entry.to_base64())).items == tmpl.items


def test_app_entry_leaves_out_empty_fields_but_not_name() -> None:
    tmpl = parse_template(AppEntry(name="", type="", origin_id="").to_template())
    assert tmpl.items == [("NAME", "")]
    zero = parse_template(AppEntry(name="z", size_mb=0, regtime=0).to_template())
    assert zero.get("SIZE") == "0" and zero.get("REGTIME") == "0"


def test_vm_and_service_template_vectors() -> None:
    vm = AppEntry(
        name="Service",
        type="SERVICE_TEMPLATE",
        disks=[{"NAME": "disk0", "APP": 'Ubuntu "24"'}],
        roles=[{"NAME": "master", "APP": "VM ]]> tpl"}, {"NAME": "worker", "APP": "VM\\"}],
    )
    tmpl = parse_template(vm.to_template())
    assert tmpl.get_all("DISK") == [{"NAME": "disk0", "APP": 'Ubuntu "24"'}]
    assert tmpl.get_all("ROLE") == [
        {"NAME": "master", "APP": "VM ]] > tpl"},
        {"NAME": "worker", "APP": "VM\\ "},
    ]


def test_monitor_result_template() -> None:
    apps = [AppEntry(name=f"app {i}", description=HOSTILE) for i in range(3)]
    text = MonitorResult(used_mb=10, free_mb=20, total_mb=30, apps=apps).to_template()
    tmpl = parse_template(text)
    assert tmpl.as_dict()["USED_MB"] == "10"
    assert (tmpl.get("FREE_MB"), tmpl.get("TOTAL_MB")) == ("20", "30")
    encoded = tmpl.get_all("APP")
    assert len(encoded) == 3
    names = [parse_template(_decode_app(v)).get("NAME") for v in encoded]  # type: ignore[arg-type]
    assert names == ["app 0", "app 1", "app 2"]
    assert MonitorResult(0, 0, 0).to_template().count("\n") == 3


class OnlyMonitor(Backend):
    driver = "only"

    def monitor(self) -> MonitorResult:
        return MonitorResult(1, 2, 3)


def _context() -> Context:
    return Context(installation=Installation.detect({}))


def test_backend_defaults_refuse_import_and_delete() -> None:
    b = OnlyMonitor(Market(1, "m", "only"), _context())
    assert b.monitor().total_mb == 3
    app = App(id=1, name="a")
    with pytest.raises(NotSupportedError, match="'only' is a public catalog: apps cannot be"):
        b.import_app(ImportRequest(app=app, source=None))  # type: ignore[arg-type]
    with pytest.raises(NotSupportedError, match="apps cannot be deleted"):
        b.delete_app(app)


def test_backend_is_abstract() -> None:
    with pytest.raises(TypeError):
        Backend(Market(1, "m", "x"), _context())  # type: ignore[abstract]


def test_context_defaults() -> None:
    c = _context()
    assert c.progress is None


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("driver", sorted(registry.DRIVERS))
def test_registered_drivers_load(driver: str) -> None:
    cls = registry.backend_class(driver)
    assert issubclass(cls, Backend)


def test_unknown_driver() -> None:
    with pytest.raises(NotSupportedError) as err:
        registry.backend_class("nosuch")
    assert str(err.value) == "Marketplace driver 'nosuch' not available"


def test_driver_module_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.DRIVERS, "later", "onemarket.backends.not_yet:Later")
    with pytest.raises(NotSupportedError, match="'later' is not built in this version"):
        registry.backend_class("later")


def test_missing_dependency_is_not_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A module that exists but imports something missing must not look 'not built'."""
    pkg = tmp_path / "fakepkg_onemarket_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.DRIVERS, "broken", "fakepkg_onemarket_test.broken:X")
    with pytest.raises(NotSupportedError) as err:
        registry.backend_class("broken")
    assert str(err.value) == (
        "marketplace driver 'broken' needs the Python module "
        "'a_dependency_that_is_not_installed', which is not installed"
    )


def test_load_backend() -> None:
    registry.DRIVERS.setdefault("only-test", f"{__name__}:OnlyMonitor")
    try:
        b = registry.load_backend("only-test", Market(1, "m", "only-test"), _context())
        assert isinstance(b, OnlyMonitor)
    finally:
        registry.DRIVERS.pop("only-test", None)
