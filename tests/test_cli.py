"""``one-market`` against real servers: nginx (http), a catalog web server (one,
linuxcontainers), Ceph RGW (s3), and a fake oned over XML-RPC for markets read with pyone."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from onemarket import cli, driverlog
from onemarket.progress import ProgressEvent
from onemarket.registry import load_backend
from onemarket.template import parse_template, write_template
from rich.console import Console

from tests.backends.test_s3 import raw_client
from tests.servers import free_port
from tests.servers.fake_oned import (
    FakeDatastore,
    FakeHost,
    FakeMarket,
    FakeOned,
    use_one_auth,
    validate,
)
from tests.servers.httpd import StaticHttpServer
from tests.servers.nginx import Nginx
from tests.servers.sshd import Sshd
from tests.waiting import signal_when

REPO = Path(__file__).resolve().parents[1]
ONE_CATALOG = REPO / "tests" / "data" / "one-community-appliance.json"
MIB = 1 << 20
VDI_HEAD = b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + b"\x7f\x10\xda\xbe"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No oned, no real OpenNebula folders, caches in the test's folder."""
    monkeypatch.setenv("ONE_LOCATION", str(tmp_path / "one"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("ONE_AUTH", "ONE_XMLRPC", "ONE_MARKET_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def template_file(tmp_path: Path, name: str, **attrs: str) -> str:
    path = tmp_path / f"{name}.tmpl"
    path.write_text(write_template([("NAME", name), *attrs.items()]))
    return str(path)


def image_file(tmp_path: Path, size: int, name: str = "disk.img", head: bytes = b"") -> Path:
    path = tmp_path / name
    data = head + os.urandom(size - len(head))
    path.write_bytes(data)
    return path


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("one-market: ")
    return lines[0]


# --------------------------------------------------------------------------- http + nginx


@pytest.fixture
def http_market(tmp_path: Path, nginx: Nginx) -> str:
    return template_file(
        tmp_path,
        "web",
        MARKET_MAD="http",
        BASE_URL=nginx.base_url,
        PUBLIC_DIR=str(nginx.public_dir),
    )


def test_http_check_passes(capfd, http_market: str, nginx: Nginx, monkeypatch) -> None:
    built = []  # the checks and the monitor share one backend (an s3 one is a boto3 client)
    monkeypatch.setattr(cli, "load_backend", lambda *a: built.append(a) or load_backend(*a))
    code, out, _ = run(capfd, "check", http_market)
    assert len(built) == 1
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "marketplace 'web' (MARKET_MAD=http)"
    names = [line.split(":")[0] for line in lines[1:-1]]
    assert names == ["PASS  driver", "PASS  attributes", "PASS  PUBLIC_DIR", "PASS  BASE_URL",
                     "PASS  monitor"]  # fmt: skip
    assert lines[-1] == "5 checks, 0 failed"
    assert list(nginx.public_dir.iterdir()) == []  # the probe is gone


def test_check_lines_go_to_stdout_of_the_console_script(http_market: str) -> None:
    exe = Path(sys.executable).parent / "one-market"
    proc = subprocess.run([exe, "check", http_market], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PASS  ") == 5
    assert "PASS" not in proc.stderr


def test_http_check_finds_base_url_not_serving_public_dir(
    capfd, tmp_path: Path, nginx: Nginx
) -> None:
    market = template_file(
        tmp_path,
        "web",
        MARKET_MAD="http",
        BASE_URL=nginx.base_url + "/elsewhere",
        PUBLIC_DIR=str(nginx.public_dir),
    )
    code, out, _ = run(capfd, "check", market)
    assert code == 1
    (line,) = [x for x in out.splitlines() if "BASE_URL" in x]
    assert line.startswith("FAIL  BASE_URL: a probe written to")
    assert "HTTP 404" in line
    assert list(nginx.public_dir.iterdir()) == []


def test_http_check_json_and_missing_dir(capfd, tmp_path: Path) -> None:
    market = template_file(
        tmp_path,
        "web",
        MARKET_MAD="http",
        BASE_URL="http://127.0.0.1:9/x",
        PUBLIC_DIR=str(tmp_path / "absent"),
    )
    code, out, _ = run(capfd, "check", market, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["market"] == {"id": -1, "name": "web", "driver": "http"}
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["PUBLIC_DIR"]["ok"] is False
    assert "does not exist" in by_name["PUBLIC_DIR"]["detail"]
    assert by_name["monitor"]["ok"] is False


def test_http_check_missing_attributes(capfd, tmp_path: Path) -> None:
    market = template_file(tmp_path, "web", MARKET_MAD="http", BASE_URL="http://127.0.0.1:9/")
    code, out, _ = run(capfd, "check", market)
    assert code == 1
    assert "FAIL  attributes: missing required PUBLIC_DIR" in out


def test_http_push_apps_rm(capfd, tmp_path: Path, http_market: str, nginx: Nginx) -> None:
    image = image_file(tmp_path, 3 * MIB + 123, head=b"QFI\xfb")
    code, out, err = run(capfd, "push", http_market, str(image), "--name", "my app")
    assert code == 0, err
    result = parse_template(out)
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    assert result.get("MD5") == md5
    assert result.get("SIZE") == "4"
    assert result.get("FORMAT") == "qcow2"
    source = result.get("SOURCE")
    assert source is not None and source.startswith(nginx.base_url + "/")
    served = requests.get(source, timeout=10)
    assert hashlib.md5(served.content).hexdigest() == md5
    assert "\r" not in err  # no progress bar when stderr is not a terminal

    code, out, _ = run(capfd, "apps", http_market)
    assert code == 0
    assert out.splitlines()[-1].startswith("0 apps, USED_MB=")

    code, out, _ = run(capfd, "rm", http_market, source)
    assert code == 0
    assert out == f"deleted {source}\n"
    assert list(nginx.public_dir.iterdir()) == []


def test_http_push_json(capfd, tmp_path: Path, http_market: str) -> None:
    image = image_file(tmp_path, 1000)
    code, out, _ = run(capfd, "--json", "push", http_market, str(image), "--id", "42")
    assert code == 0
    data = json.loads(out)
    assert data["md5"] == hashlib.md5(image.read_bytes()).hexdigest()
    assert (data["app_id"], data["name"], data["format"], data["size_mb"]) == (
        42,
        "disk.img",
        "raw",
        1,
    )
    assert "/app-42-" in data["source"]
    code, out, _ = run(capfd, "rm", http_market, data["source"], "--json")
    assert code == 0
    assert json.loads(out)["deleted"] == data["source"]


def test_http_rm_refuses_traversal(capfd, tmp_path: Path, http_market: str, nginx: Nginx) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    code, _, err = run(capfd, "rm", http_market, nginx.base_url + "/../victim")
    assert code == 1
    assert "PUBLIC_DIR" in one_line_error(err)
    assert victim.exists()


def test_push_errors_are_one_line(capfd, tmp_path: Path, http_market: str) -> None:
    code, _, err = run(capfd, "push", http_market, str(tmp_path / "nope.img"))
    assert code == 1
    assert "cannot read" in one_line_error(err)
    code, _, err = run(capfd, "push", http_market, str(tmp_path))
    assert code == 1
    assert "directory" in one_line_error(err)


# --------------------------------------------------------------------------- http + BRIDGE_LIST


def bridge_market(tmp_path: Path, nginx: Nginx, hosts: str) -> str:
    return template_file(
        tmp_path,
        "bridged",
        MARKET_MAD="http",
        BASE_URL=nginx.base_url,
        PUBLIC_DIR=str(nginx.public_dir),
        BRIDGE_LIST=hosts,
    )


def test_http_bridge_check_push_rm(capfd, tmp_path: Path, nginx: Nginx, sshd: Sshd) -> None:
    market = bridge_market(tmp_path, nginx, "bridge1 bridge2")
    code, out, _ = run(capfd, "check", market)
    assert code == 0, out
    for host in ("bridge1", "bridge2"):
        assert f"PASS  ssh {host}: reachable" in out
        assert f"PASS  PUBLIC_DIR on {host}:" in out
        assert f"PASS  BASE_URL: serves {host}:" in out
    assert list(nginx.public_dir.iterdir()) == []

    image = image_file(tmp_path, 300_000)
    code, out, err = run(capfd, "push", market, str(image), "--id", "3")
    assert code == 0, err
    source = parse_template(out).get("SOURCE") or ""
    assert requests.get(source, timeout=10).content == image.read_bytes()
    code, out, _ = run(capfd, "rm", market, source)
    assert code == 0, out
    assert list(nginx.public_dir.iterdir()) == []


def test_http_bridge_check_reports_dead_and_disabled_hosts(
    capfd, tmp_path: Path, nginx: Nginx, sshd: Sshd, fake_oned: FakeOned, monkeypatch
) -> None:
    config = tmp_path / "ssh_config"
    dead_port = free_port()
    config.write_text(
        f"Host deadbridge\n    HostName 127.0.0.1\n    Port {dead_port}\n\n"
        + sshd.config.read_text()
    )
    monkeypatch.setenv("ONE_MARKET_SSH_CONFIG", str(config))
    fake_oned.hosts = [FakeHost(0, "bridge1", 2), FakeHost(1, "bridge2", 4)]
    market = bridge_market(tmp_path, nginx, "bridge1 bridge2 deadbridge")
    code, out, _ = run(capfd, "check", market)
    assert code == 1
    assert "PASS  oned hosts: imports skip bridge2 (oned state)" in out
    assert "PASS  ssh bridge1" in out
    (dead,) = [x for x in out.splitlines() if x.startswith("FAIL  ssh deadbridge")]
    assert "ssh failed" in dead


# --------------------------------------------------------------------------- public catalogs


@pytest.fixture
def one_market(tmp_path: Path, httpd: StaticHttpServer) -> str:
    httpd.routes["/appliance"] = ONE_CATALOG.read_bytes()
    return template_file(tmp_path, "community", MARKET_MAD="one", ENDPOINT=httpd.url)


def test_one_catalog_check_and_apps(capfd, one_market: str) -> None:
    appliances = json.loads(ONE_CATALOG.read_bytes())["appliances"]
    code, out, _ = run(capfd, "check", one_market)
    assert code == 0, out
    (line,) = [x for x in out.splitlines() if x.startswith("PASS  monitor")]
    assert "apps" in line

    code, out, _ = run(capfd, "apps", one_market, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["apps"]
    assert len(data["apps"]) <= len(appliances)
    names = {a["name"] for a in data["apps"]}
    assert appliances[0]["name"] in " ".join(names)

    code, out, _ = run(capfd, "apps", one_market)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "TYPE", "ARCH", "HYPERVISOR", "SIZE", "FORMAT"]
    assert lines[-1].startswith(f"{len(data['apps'])} apps, ")
    assert len(lines) == len(data["apps"]) + 2


def test_one_catalog_unreachable(capfd, tmp_path: Path, httpd: StaticHttpServer) -> None:
    market = template_file(tmp_path, "community", MARKET_MAD="one", ENDPOINT=httpd.url)
    code, out, _ = run(capfd, "check", market)  # no /appliance route: 404
    assert code == 1
    assert [x for x in out.splitlines() if x.startswith("FAIL  monitor")]
    code, _, err = run(capfd, "apps", market)
    assert code == 1
    one_line_error(err)


def test_public_catalog_refuses_push_and_rm(capfd, tmp_path: Path, one_market: str) -> None:
    image = image_file(tmp_path, 100)
    code, _, err = run(capfd, "push", one_market, str(image))
    assert code == 1
    assert "public catalog" in one_line_error(err)
    code, _, err = run(capfd, "rm", one_market, "https://example.invalid/x")
    assert code == 1
    assert "public catalog" in one_line_error(err)


def test_linuxcontainers_check_and_apps(capfd, tmp_path: Path, httpd: StaticHttpServer) -> None:
    from tests.tools import gen_images_json

    out_dir = tmp_path / "lxc"
    gen_images_json.main(["--only", "alpine:3.19|debian:bookworm", "-o", str(out_dir)])
    capfd.readouterr()
    for name in ("images.json", "index.json"):
        httpd.routes[f"/streams/v1/{name}"] = (out_dir / "streams" / "v1" / name).read_bytes()
    market = template_file(tmp_path, "lxc", MARKET_MAD="linuxcontainers", ENDPOINT=httpd.url)
    code, out, _ = run(capfd, "check", market)
    assert code == 0, out
    code, out, _ = run(capfd, "apps", market, "--json")
    assert code == 0
    apps = json.loads(out)["apps"]
    assert apps
    assert all("alpine" in a["name"].lower() or "debian" in a["name"].lower() for a in apps)


# --------------------------------------------------------------------------- s3 + Ceph RGW


def s3_template(tmp_path: Path, rgw, bucket: str, **extra: str) -> str:
    """A template file of an s3 marketplace on the test RGW."""
    return template_file(
        tmp_path,
        "ceph",
        MARKET_MAD="s3",
        ENDPOINT=rgw.endpoint,
        ACCESS_KEY_ID=rgw.access_key,
        REGION="default",
        BUCKET=bucket,
        AWS="no",
        **{"SECRET_ACCESS_KEY": rgw.secret_key, **extra},
    )


@pytest.fixture
def s3_market(tmp_path: Path, rgw) -> str:
    return s3_template(tmp_path, rgw, f"cli-{os.urandom(4).hex()}")


def test_s3_check_push_apps_rm(capfd, tmp_path: Path, s3_market: str, rgw) -> None:
    code, out, _ = run(capfd, "check", s3_market)
    assert code == 0, out
    assert "PASS  credentials" in out
    assert "has been created" in out  # the bucket did not exist yet
    assert "PASS  multipart" in out
    code, out, _ = run(capfd, "check", s3_market)
    assert code == 0 and "reachable" in out

    image = image_file(tmp_path, 2 * MIB)
    code, out, err = run(capfd, "push", s3_market, str(image), "--id", "7")
    assert code == 0, err
    result = parse_template(out)
    assert result.get("MD5") == hashlib.md5(image.read_bytes()).hexdigest()
    source = result.get("SOURCE") or ""
    assert source.endswith("/marketapp-7")

    code, out, _ = run(capfd, "apps", s3_market, "--json")
    assert code == 0
    assert json.loads(out)["used_mb"] >= 2

    code, out, _ = run(capfd, "rm", s3_market, source)
    assert code == 0, out
    code, out, err = run(capfd, "rm", s3_market, source)  # gone now: an error, not "deleted"
    assert code == 1 and out == ""
    assert "does not exist, nothing deleted" in one_line_error(err)


def test_s3_check_wrong_secret(capfd, tmp_path: Path, rgw) -> None:
    secret = "Wrong-Secret-Key-0123456789"
    market = s3_template(tmp_path, rgw, "cli-wrong", SECRET_ACCESS_KEY=secret)
    code, out, err = run(capfd, "check", market)
    assert code == 1
    assert "FAIL  credentials" in out
    assert secret not in out + err
    code, out, err = run(capfd, "check", market, "--json", "--debug")
    assert secret not in out + err


def test_s3_debug_shows_no_credentials(capfd, s3_market: str, rgw) -> None:
    """--debug: our DEBUG lines, none of boto's request signing (Authorization headers with
    the access key id and signature, canonical requests, strings to sign)."""
    code, out, err = run(capfd, "check", s3_market, "--debug")
    assert code == 0, err
    text = out + err
    assert rgw.access_key not in text and rgw.secret_key not in text
    for word in ("Authorization", "Signature=", "Credential=", "StringToSign", "Canonical"):
        assert word not in text
    assert len(err.splitlines()) < 60, err  # was ~220 lines of botocore


# --------------------------------------------------------------------------- oned via pyone


def test_markets_from_oned_by_id_and_name(
    capfd, fake_oned: FakeOned, nginx: Nginx, httpd: StaticHttpServer
) -> None:
    httpd.routes["/appliance"] = ONE_CATALOG.read_bytes()
    fake_oned.markets = [
        FakeMarket(0, "OpenNebula Public", "one", {"ENDPOINT": httpd.url}, app_ids=[0, 1]),
        FakeMarket(
            100,
            "Private web",
            "http",
            {"BASE_URL": nginx.base_url, "PUBLIC_DIR": str(nginx.public_dir)},
        ),
    ]
    code, out, _ = run(capfd, "check", "100")
    assert code == 0, out
    assert out.startswith("marketplace 'Private web' (MARKET_MAD=http)")
    assert "PASS  state: marketplace 100 is ENABLED in oned" in out
    assert out.splitlines()[-1] == "6 checks, 0 failed"
    code, out, _ = run(capfd, "--json", "check", "OpenNebula Public")
    assert code == 0, out
    assert json.loads(out)["market"] == {"id": 0, "name": "OpenNebula Public", "driver": "one"}
    assert fake_oned.calls == ["one.market.info", "one.marketpool.info"]
    for document in fake_oned.answers:
        validate(document)


def test_oned_errors_are_one_line(capfd, fake_oned: FakeOned, tmp_path: Path, monkeypatch) -> None:
    fake_oned.markets = [FakeMarket(3, "web", "http")]
    code, _, err = run(capfd, "check", "9")
    assert code == 1
    assert "no marketplace with id 9" in one_line_error(err)
    code, _, err = run(capfd, "apps", "missing")
    assert code == 1
    assert "no marketplace named 'missing'" in one_line_error(err)
    bad = tmp_path / "bad_auth"
    bad.write_text("oneadmin:Not-The-Password-1\n")
    monkeypatch.setenv("ONE_AUTH", str(bad))
    code, _, err = run(capfd, "check", "3", "--debug")
    assert code == 1
    assert "refused the credentials" in err
    assert "Traceback" in err  # --debug shows it
    assert "Not-The-Password-1" not in err


def test_no_oned_configured(capfd) -> None:
    code, _, err = run(capfd, "check", "Ceph")
    assert code == 1
    assert "oned is not configured" in one_line_error(err)


def test_bad_template_file(capfd, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tmpl"
    bad.write_text('NAME = "unterminated\n')
    code, _, err = run(capfd, "check", str(bad))
    assert code == 1
    assert "syntax error" in one_line_error(err)
    nomad = tmp_path / "nomad.tmpl"
    nomad.write_text('NAME = "x"\n')
    code, _, err = run(capfd, "apps", str(nomad))
    assert code == 1
    assert "MARKET_MAD is missing" in one_line_error(err)
    odd = template_file(tmp_path, "odd", MARKET_MAD="ftp")
    code, out, _ = run(capfd, "check", odd)
    assert code == 1
    assert "FAIL  driver: unknown MARKET_MAD 'ftp'" in out
    assert out.splitlines()[-1] == "1 check, 1 failed"


# --------------------------------------------------------------------------- pieces


def test_console_script_usage_and_version() -> None:
    exe = Path(sys.executable).parent / "one-market"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("one-market ")
    proc = subprocess.run([exe, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
        (b"KDMV\x01\x00", "vmdk"),
        (b"# Disk DescriptorFile\n", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (VDI_HEAD, "vdi"),
        (b"\0" * 600, "raw"),
    ],
)
def test_sniff_format(tmp_path: Path, head: bytes, fmt: str) -> None:
    path = tmp_path / "img"
    path.write_bytes(head + b"\0" * 64)
    assert cli.sniff_format(path) == fmt


def terminal(width: int = 100) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=width, color_system=None), buf


def test_transfer_bar_draws_bytes_rate_and_percent() -> None:
    out, buf = terminal()
    bar = cli.TransferBar("push x", out)
    bar(ProgressEvent(50 * MIB, 100 * MIB, 1.0))
    bar(ProgressEvent(100 * MIB, 100 * MIB, 2.0, final=True))
    bar.close()  # idempotent after the final event
    text = buf.getvalue()
    assert "push x" in text and "50%" in text and "100%" in text
    assert "100.0/100.0 MiB" in text
    assert cli.TransferBar.interval_s < 1


def test_table_fits_a_terminal_and_is_plain_otherwise(capsys) -> None:
    rows = [("A" * 80, "1.0", "IMAGE", "x86_64", "kvm", "2.0 GiB", "qcow2")]
    out, buf = terminal(width=70)
    cli.print_table(rows, out)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == list(cli.APP_COLUMNS)
    assert all(len(line) <= 70 for line in lines)
    assert "\u2026" in lines[1]  # the long name is cut with an ellipsis
    cli.print_table(rows, Console(file=io.StringIO()))  # not a terminal: plain print
    plain = capsys.readouterr().out.splitlines()
    assert plain[1].startswith("A" * 80)


def test_check_lines_are_coloured_on_a_terminal_only(tmp_path: Path) -> None:
    from onemarket.action import Market

    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=100, color_system="standard")
    checker = cli.Checker(Market(-1, "x", "http"), cli.context(), echo=True, out=out)
    checker.add("driver", True, "MARKET_MAD=http")
    checker.add("BASE_URL", False, "no\x1b[2J escape")
    lines = buf.getvalue().splitlines()
    assert "\x1b[" in lines[0] and "PASS" in lines[0] and "MARKET_MAD=http" in lines[0]
    assert lines[1].count("\x1b[2J") == 0  # catalog or error text never drives the terminal


def test_a_market_mad_with_a_newline_cannot_forge_a_check_line(capfd, tmp_path: Path) -> None:
    """MARKET_MAD comes from the template file: printed, it stays on its own line, escapes
    and all."""
    forged = "bogus\nPASS  everything: forged line\x1b[31mRED"
    code, out, _ = run(capfd, "check", template_file(tmp_path, "m", MARKET_MAD=forged))
    assert code == 1
    assert not any(line.startswith("PASS") for line in out.splitlines()), out
    assert "\x1b" not in out


def test_steps_are_spinner_lines_on_a_terminal() -> None:
    out, buf = terminal()
    with cli.Steps(False, out) as steps:
        steps.show("image 1: LOCKED, 4 MB")
        steps.done("image 1: READY, 4 MB")
        steps.show("app 2 'x': LOCKED")
    text = buf.getvalue()
    assert "ok image 1: READY, 4 MB" in text and "app 2 'x': LOCKED" in text
    assert "0:00:0" in text  # elapsed time of each step
    assert "one-market:" not in text  # the plain-line prefix is for pipes and files


def test_steps_are_plain_lines_off_a_terminal() -> None:
    buf = io.StringIO()
    with cli.Steps(False, Console(file=buf)) as steps:
        steps.show("image 1: LOCKED")
        steps.show("image 1: LOCKED")  # unchanged: not repeated
        steps.done("image 1: READY")
    assert buf.getvalue().splitlines() == [
        "one-market: image 1: LOCKED",
        "one-market: image 1: READY",
    ]
    buf = io.StringIO()
    with cli.Steps(True, Console(file=buf)) as steps:
        steps.done("image 1: READY")
    assert buf.getvalue() == ""


def test_mask_credentials_in_library_lines() -> None:
    line = (
        "botocore.endpoint: Sending http request: <AWSPreparedRequest headers={'Authorization': "
        "b'AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20260101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=0123abcd'}> https://h/b?X-Amz-Signature=beef&x=1"
    )
    masked = driverlog.mask_credentials(line)
    for secret in ("AKIAEXAMPLE", "0123abcd", "beef", "AWS4-HMAC"):
        assert secret not in masked
    assert "Signature:\n****" in driverlog.mask_credentials("Signature:\n0f0f0f")
    assert "x=1" in masked


def test_printable_strips_terminal_controls() -> None:
    assert cli.printable("evil\x1b[2Jname\nnext\x07") == "evil [2Jname next"


def test_app_id_from_source() -> None:
    assert cli.app_id_from_source("http://h/market/app-42-0123abcd") == 42
    assert cli.app_id_from_source("s3://bucket/marketapp-7") == 7
    assert cli.app_id_from_source("http://h/market/5f3c1d") == -1


def test_push_shows_a_bar_on_a_terminal_only(tmp_path: Path, http_market: str) -> None:
    """The console script with stderr on a pseudo-terminal draws the bar; stdout stays clean."""
    import pty
    import select

    exe = Path(sys.executable).parent / "one-market"
    image = image_file(tmp_path, 2 * MIB)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [exe, "push", http_market, str(image)],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        slave = -1
        seen = b""
        for _ in range(600):  # bounded: 600 x 0.1 s
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, seen
    assert b"100%" in seen and b"MiB" in seen
    assert parse_template(out.decode()).get("MD5") == hashlib.md5(image.read_bytes()).hexdigest()


def open_writer(fifo: Path, proc: subprocess.Popen) -> io.BufferedWriter:
    """The write end of ``fifo`` once ``proc`` has opened it for reading (bounded: a plain
    open would block forever if the command failed before opening it)."""
    import errno
    import fcntl

    for _ in range(1200):  # 1200 x 0.05 s
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or proc.poll() is not None:
                raise AssertionError(f"{fifo} not opened (exit {proc.poll()})") from None
            time.sleep(0.05)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "wb")
    raise AssertionError(f"the command did not open {fifo} in time")


@pytest.mark.parametrize(
    ("signum", "status", "words"),
    [
        (signal.SIGINT, cli.EXIT_INTERRUPTED, "push interrupted (Ctrl-C)"),
        (signal.SIGTERM, cli.EXIT_TERMINATED, "push stopped by SIGTERM (sent by kill, timeout"),
        (signal.SIGHUP, cli.EXIT_HANGUP, "push stopped by SIGHUP (its terminal or ssh session"),
    ],
)
def test_push_stopped_by_a_signal_leaves_nothing(
    tmp_path: Path, http_market: str, nginx: Nginx, signum: int, status: int, words: str
) -> None:
    """Ctrl-C, kill or a closed ssh session mid-copy: the shell's exit status for the signal,
    one line in words for a terminal user, no partial or temporary file in PUBLIC_DIR.

    The image is a named pipe fed by the test, so the signal lands mid-copy without timing.
    """
    exe = Path(sys.executable).parent / "one-market"
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [exe, "push", http_market, str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    with open_writer(fifo, proc) as writer:
        writer.write(os.urandom(4 * MIB))
        writer.flush()
        copying = lambda: any(nginx.public_dir.iterdir())  # noqa: E731
        out, err = signal_when(proc, copying, "the copy's temporary file", signum)
    assert proc.returncode == status, err
    line = err.decode().strip()
    assert line.startswith(f"one-market: {words}"), line
    assert "\n" not in line and "driver shutdown" not in line
    assert out == b""
    assert list(nginx.public_dir.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ("check", "/nonexistent.tmpl"),
        ("apps", "/nonexistent.tmpl"),
        ("push", "/nonexistent.tmpl", "/etc/hostname"),
        ("rm", "/nonexistent.tmpl", "s3://bucket/marketapp-1"),
    ],
)
def test_json_failure_is_json_on_stdout(capfd, args: tuple[str, ...]) -> None:
    """A script reading ``--json`` output gets JSON on failure too, plus the usual one line."""
    code, out, err = run(capfd, *args, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert "cannot read" in data["error"]
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("push", "m.tmpl"),
        ("rm", "m", "s", "--id", "x"),
        ("check",),
        ("push", "m", "f", "--timeout", "0"),
        ("rm", "m", "s", "--timeout", "nan"),
    ],
)
def test_usage_errors_are_one_line_and_json(capfd, args: tuple[str, ...]) -> None:
    """argparse's usage block plus error becomes one line, exit 2; JSON too with --json."""
    code, out, err = run(capfd, *args)
    assert code == cli.EXIT_USAGE and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("one-market: ")
    code, out, err = run(capfd, *args, "--json")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1
    assert json.loads(out)["ok"] is False


def test_sigterm_during_check_removes_the_probe(tmp_path: Path) -> None:
    """``timeout one-market check`` while BASE_URL hangs: SIGTERM must not leave the probe
    file in PUBLIC_DIR (a published folder); one line, exit 143, JSON under --json."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    public = tmp_path / "public"
    public.mkdir()
    market = template_file(
        tmp_path,
        "web",
        MARKET_MAD="http",
        BASE_URL=f"http://127.0.0.1:{silent.getsockname()[1]}/x",
        PUBLIC_DIR=str(public),
    )
    exe = Path(sys.executable).parent / "one-market"
    proc = subprocess.Popen(
        [exe, "check", market, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        probing = lambda: any(public.iterdir())  # noqa: E731
        out, err = signal_when(proc, probing, "the probe file", signal.SIGTERM)
    finally:
        silent.close()
    assert proc.returncode == cli.EXIT_TERMINATED, err
    said = "check stopped by SIGTERM (sent by kill, timeout, a service manager or a shutdown)"
    assert err.decode().strip() == f"one-market: {said}"
    assert json.loads(out) == {"ok": False, "error": said}
    assert list(public.iterdir()) == []


# --------------------------------------------------------------------------- push, rm via oned


@pytest.fixture
def oned_http(fake_oned: FakeOned, nginx: Nginx, monkeypatch: pytest.MonkeyPatch) -> FakeOned:
    """oned with http marketplace 100 (nginx) and image datastore 1, whose market driver is
    our http backend: an app's import and delete really write and remove PUBLIC_DIR files."""
    from onemarket.action import App, ImportInfo, Market
    from onemarket.backends.base import ImportRequest

    market = FakeMarket(
        100,
        "Private web",
        "http",
        {"BASE_URL": nginx.base_url, "PUBLIC_DIR": str(nginx.public_dir)},
    )
    fake_oned.markets = [market, FakeMarket(0, "OpenNebula Public", "one")]
    fake_oned.datastores = [FakeDatastore(0, "system", type=1), FakeDatastore(1, "default")]

    def backend():  # built here: the fake answers one call at a time, so no oned lookup
        defined = Market(id=market.id, name=market.name, driver="http", attrs=market.template)
        return load_backend("http", defined, cli.context())

    def importer(image, app):
        info = ImportInfo(source=image.path, size_mb=image.size_mb, format=image.format)
        request = ImportRequest(App(id=app.id, name=app.name, size_mb=image.size_mb), info)
        result = backend().import_app(request)
        return result.source, result.md5, result.size_mb, result.format

    fake_oned.importer = importer
    fake_oned.deleter = lambda app: backend().delete_app(App(id=app.id, name="", source=app.source))
    monkeypatch.setattr(cli, "POLL_FIRST_S", 0.01)
    monkeypatch.setattr(cli, "POLL_MAX_S", 0.02)
    return fake_oned


def test_push_through_oned_makes_a_ready_app_and_rm_deletes_it(
    capfd, tmp_path: Path, oned_http: FakeOned, nginx: Nginx
) -> None:
    image = image_file(tmp_path, 3 * MIB + 5, head=b"QFI\xfb")
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    args = ("push", "100", str(image), "--name", "Pushed Debian", "--datastore", "default")
    code, out, err = run(capfd, *args, "--delete-image")
    assert code == 0, err
    result = parse_template(out)
    (app,) = oned_http.apps.values()
    assert (app.name, app.state, app.md5, app.size_mb) == ("Pushed Debian", 1, md5, 4)
    assert result.get("ID") == str(app.id) and result.get("MD5") == md5
    assert result.get("SIZE") == "4" and result.get("FORMAT") == "qcow2"
    assert hashlib.md5(requests.get(app.source, timeout=10).content).hexdigest() == md5
    assert oned_http.images == {}  # --delete-image
    assert oned_http.markets[0].app_ids == [app.id]
    lines = err.splitlines()  # not a terminal: one plain line per step and state
    assert "one-market: image 1 (datastore 1 'default'): LOCKED, 4 MB" in lines
    assert "one-market: image 1: READY, 4 MB" in lines
    assert f"one-market: app {app.id} 'Pushed Debian': READY, 4 MB, MD5 {md5}" in lines
    assert "plain upload" not in err
    calls = [c for c in oned_http.calls if not c.endswith(".info")]
    assert calls == ["one.image.allocate", "one.marketapp.allocate", "one.image.delete"]

    code, out, err = run(capfd, "rm", "100", app.source)
    assert code == 0, err
    assert out == f"deleted app {app.id} through oned: {app.source}\n"
    assert oned_http.apps == {}
    assert list(nginx.public_dir.iterdir()) == []
    assert "one.marketapp.delete" in oned_http.calls
    for document in oned_http.answers:
        validate(document)


def test_push_through_oned_json_keeps_the_image_unless_asked(
    capfd, tmp_path: Path, oned_http: FakeOned
) -> None:
    image = image_file(tmp_path, 1000)
    code, out, err = run(capfd, "--json", "push", "Private web", str(image), "--datastore", "1")
    assert code == 0, err
    data = json.loads(out)
    (app,) = oned_http.apps.values()
    assert data["app_id"] == app.id and data["name"] == "disk.img"
    assert data["md5"] == hashlib.md5(image.read_bytes()).hexdigest()
    assert data["market"] == {"id": 100, "name": "Private web", "driver": "http"}
    assert data["image_deleted"] is False and list(oned_http.images) == [data["image_id"]]
    assert err == ""  # --json: no step lines


def test_push_through_oned_failures_remove_what_they_made(
    capfd, tmp_path: Path, oned_http: FakeOned, nginx: Nginx
) -> None:
    image = image_file(tmp_path, 1000)

    def broken(image, app):
        raise OSError("No space left on device")

    oned_http.importer = broken
    code, _, err = run(capfd, "push", "100", str(image), "--datastore", "1", "--quiet")
    assert code == 1
    line = one_line_error(err)
    assert "oned could not make app" in line and "No space left on device" in line
    assert [a.deleting for a in oned_http.apps.values()] == [True]  # dropped on the MAD's answer
    assert oned_http.images == {}

    oned_http.image_copy_fails = "cp: /srv is in RESTRICTED_DIRS"
    code, _, err = run(capfd, "push", "100", str(image), "--datastore", "1", "--quiet")
    assert code == 1
    assert "could not copy" in one_line_error(err) and "RESTRICTED_DIRS" in err
    assert oned_http.images == {}
    assert list(nginx.public_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--datastore", "0"), "is a SYSTEM datastore"),
        (("--datastore", "nope"), "no datastore named 'nope'"),
        ((), "needs --datastore"),
        (("--datastore", "1", "--id", "5"), "--id is for template files"),
        (("--datastore", "1", "--format", "qcow2"), "--format is for template files"),
    ],
)
def test_push_through_oned_usage(capfd, tmp_path: Path, oned_http: FakeOned, args, words) -> None:
    image = image_file(tmp_path, 100)
    code, _, err = run(capfd, "push", "100", str(image), *args)
    assert code == 1
    assert words in one_line_error(err)
    assert oned_http.images == {}


def test_push_of_a_file_oned_cannot_read_says_where_it_reads(
    capfd, tmp_path: Path, oned_http: FakeOned
) -> None:
    image = image_file(tmp_path, 100)
    oned_http.unreadable_paths.add(str(image))  # one-market runs on another host than oned
    code, _, err = run(capfd, "push", "100", str(image), "--datastore", "1", "--quiet")
    assert code == 1
    line = one_line_error(err)
    assert "Cannot parse image SIZE" in line and "on oned's host, as oneadmin" in line


def test_push_to_a_public_marketplace_of_oned_is_refused(
    capfd, tmp_path: Path, oned_http: FakeOned
) -> None:
    code, _, err = run(capfd, "push", "0", str(image_file(tmp_path, 100)), "--datastore", "1")
    assert code == 1
    assert "public catalog" in one_line_error(err)


def test_plain_push_says_so(capfd, tmp_path: Path, http_market: str) -> None:
    code, _, err = run(capfd, "push", http_market, str(image_file(tmp_path, 100)), "--id", "1")
    assert code == 0
    (line,) = err.splitlines()
    assert line.startswith("one-market: plain upload (") and "no app of oned lists it" in line
    code, _, err = run(capfd, "push", http_market, str(image_file(tmp_path, 1)), "--datastore", "1")
    assert code == 1
    assert "need MARKET to be a marketplace of oned" in one_line_error(err)


def test_sigterm_while_oned_copies_removes_the_image_once_copied(
    tmp_path: Path, oned_http: FakeOned
) -> None:
    """A real process and signal: the push exits with the shell's status for SIGTERM once it
    has removed what it made (the copy is oned's work: waited for, then the image deleted)."""
    oned_http.image_copy_infos = 4  # copied at the third poll after the signal
    exe = Path(sys.executable).parent / "one-market"
    image = image_file(tmp_path, 100)
    proc = subprocess.Popen(
        [exe, "push", "100", str(image), "--datastore", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    waiting = lambda: "one.image.info" in oned_http.calls  # noqa: E731
    out, err = signal_when(proc, waiting, "push waiting for the image", signal.SIGTERM)
    assert proc.returncode == cli.EXIT_TERMINATED, err
    last = err.decode().splitlines()[-1]
    assert last.startswith("one-market: push stopped by SIGTERM")
    assert "removed " in last and "image 1 it made in oned" in last
    assert oned_http.images == {} and all(a.deleting for a in oned_http.apps.values())
    assert out == b""


def stop_at(oned: FakeOned, method: str, *signums: int) -> None:
    """Send the n-th of ``signums`` (SIGTERM alone by default) to this process's main thread
    (the one-market command run in-process) when oned receives ``method`` the n-th time, so
    each signal lands mid-step without timing."""
    main = threading.main_thread().ident
    sent = signums or (signal.SIGTERM,)

    def hook(called: str) -> None:
        count = oned.calls.count(method)
        if called == method and count <= len(sent) and main is not None:
            signal.pthread_kill(main, sent[count - 1])

    oned.on_call = hook


def assert_push_leaves_image_1(capfd, tmp_path: Path, oned: FakeOned) -> None:
    """A push stopped by SIGTERM while oned copies: image 1 is left to oned, named with the
    command that removes it."""
    image = image_file(tmp_path, 100)
    code, out, err = run(capfd, "push", "100", str(image), "--datastore", "1", "--quiet")
    assert code == cli.EXIT_TERMINATED and out == ""
    line = one_line_error(err)
    assert line.startswith("one-market: push stopped by SIGTERM")
    assert line.endswith(
        "; oned goes on with image 1 (oneimage delete 1): remove what you do not want"
    )
    assert list(oned.images) == [1]


def test_signal_during_the_app_import_removes_the_app_and_the_image(
    capfd, tmp_path: Path, oned_http: FakeOned, nginx: Nginx
) -> None:
    """Ctrl-C while oned imports the app: the import is waited for, then the app (its file
    deleted by the driver) and the image are removed, and nothing is printed on stdout."""
    stop_at(oned_http, "one.marketapp.info", signal.SIGINT)
    code, out, err = run(capfd, "push", "100", str(image_file(tmp_path, 1000)), "--datastore", "1")
    assert code == cli.EXIT_INTERRUPTED and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("one-market: push interrupted (Ctrl-C)")
    assert last.endswith("; removed app 2 and image 1 it made in oned")
    assert oned_http.images == {} and [a.deleting for a in oned_http.apps.values()] == [True]
    assert list(nginx.public_dir.iterdir()) == []


def test_signal_while_oned_still_copies_names_what_is_left(
    capfd, tmp_path: Path, oned_http: FakeOned, monkeypatch
) -> None:
    """A copy that outlasts the wait: the image is left to oned, named with its command."""
    monkeypatch.setattr(cli, "CLEANUP_WAIT_S", 0.05)
    oned_http.image_copy_infos = 10**9  # never done
    stop_at(oned_http, "one.image.info")
    assert_push_leaves_image_1(capfd, tmp_path, oned_http)


@pytest.mark.parametrize(
    ("method", "removed"),
    [
        ("one.image.allocate", "removed image 1 it made"),
        ("one.marketapp.allocate", "removed app 2"),
    ],
)
def test_a_signal_during_an_allocate_call_waits_for_its_answer(
    capfd, tmp_path: Path, oned_http: FakeOned, nginx: Nginx, method: str, removed: str
) -> None:
    """The signal lands while oned makes the object: it is held until oned's answer gives
    the id (transfer/interrupt.deferred), so the clean-up removes the object."""
    stop_at(oned_http, method)
    code, out, err = run(capfd, "push", "100", str(image_file(tmp_path, 100)), "--datastore", "1")
    assert code == cli.EXIT_TERMINATED and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("one-market: push stopped by SIGTERM") and removed in last, err
    assert "oned goes on" not in last
    assert oned_http.images == {} and all(a.deleting for a in oned_http.apps.values())
    assert list(nginx.public_dir.iterdir()) == []


def test_a_signal_during_a_refused_allocate_call_is_the_failure_shown(
    capfd, tmp_path: Path, oned_http: FakeOned
) -> None:
    """oned refuses the image (its stat of the file fails) while the signal is held: the stop
    is what the administrator reads, and nothing was made."""
    image = image_file(tmp_path, 100)
    stop_at(oned_http, "one.image.allocate")
    oned_http.unreadable_paths.add(str(image.resolve()))
    code, _, err = run(capfd, "push", "100", str(image), "--datastore", "1")
    assert code == cli.EXIT_TERMINATED
    assert err.splitlines()[-1] == (
        "one-market: push stopped by SIGTERM (sent by kill, timeout, a service manager or a "
        "shutdown)"
    )
    assert oned_http.images == {}


def test_a_second_signal_ends_the_clean_up_wait(capfd, tmp_path: Path, oned_http: FakeOned) -> None:
    """SIGTERM while oned copies, then Ctrl-C during the clean-up's wait for that copy: the
    wait ends there (the copy would be done at the fourth poll and the image then removed),
    the image is left and named, and the exit status is the first signal's."""
    oned_http.image_copy_infos = 4
    stop_at(oned_http, "one.image.info", signal.SIGTERM, signal.SIGINT)  # the step's, the wait's
    assert_push_leaves_image_1(capfd, tmp_path, oned_http)
    assert oned_http.calls.count("one.image.info") == 2


def test_rm_refuses_a_source_an_app_of_oned_uses(
    capfd, tmp_path: Path, oned_http: FakeOned, http_market: str, nginx: Nginx
) -> None:
    image = image_file(tmp_path, 1000)
    code, out, err = run(capfd, "push", "100", str(image), "--datastore", "1", "--quiet")
    assert code == 0, err
    source = parse_template(out).get("SOURCE") or ""
    (app,) = oned_http.apps.values()
    code, _, err = run(capfd, "rm", http_market, source)  # the template file of the same folder
    assert code == 1
    line = one_line_error(err)
    assert f"SOURCE of app {app.id} 'disk.img' of marketplace 100" in line
    assert "--force" in line
    assert len(list(nginx.public_dir.iterdir())) == 1
    code, out, err = run(capfd, "rm", http_market, source, "--force")
    assert code == 0, err
    assert out == f"deleted {source}\n"
    assert list(nginx.public_dir.iterdir()) == []


def test_rm_of_a_missing_source_is_an_error(capfd, http_market: str, nginx: Nginx) -> None:
    code, out, err = run(capfd, "rm", http_market, nginx.base_url + "/app-5-0123456789abcdef")
    assert code == 1
    assert out == ""
    line = one_line_error(err)
    assert "does not exist, nothing deleted" in line and "deleted app" not in line
    assert "is not in PUBLIC_DIR" in line  # the backend's WARN, as the detail of the one line


def test_rm_of_a_missing_source_follows_the_backend_answer(
    capfd, http_market: str, nginx: Nginx, monkeypatch
) -> None:
    """The backend's False decides, not the words of its WARN line (here it says nothing)."""
    monkeypatch.setattr(driverlog, "warn", lambda message: None)
    code, out, err = run(capfd, "rm", http_market, nginx.base_url + "/app-5-0123456789abcdef")
    assert code == 1 and out == ""
    assert one_line_error(err).endswith("/app-5-0123456789abcdef does not exist, nothing deleted")


def test_rm_with_oned_unreachable_needs_force(
    capfd, tmp_path: Path, http_market: str, nginx: Nginx, monkeypatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}/RPC2"
    use_one_auth(monkeypatch, tmp_path / "auth", "oneadmin:pw-rm")
    monkeypatch.setenv("ONE_XMLRPC", url)
    (nginx.public_dir / "app-1-00").write_bytes(b"x")
    code, _, err = run(capfd, "rm", http_market, nginx.base_url + "/app-1-00")
    assert code == 1
    assert f"cannot connect to oned at {url}" in one_line_error(err)
    code, _, err = run(capfd, "rm", http_market, nginx.base_url + "/app-1-00", "--force")
    assert code == 0, err
    assert list(nginx.public_dir.iterdir()) == []


def test_check_says_disabled_and_names_the_endpoint(
    capfd, tmp_path: Path, oned_http: FakeOned, monkeypatch
) -> None:
    oned_http.markets[0].state = 1
    code, out, _ = run(capfd, "check", "100")
    assert code == 1
    assert "FAIL  state: marketplace 100 is DISABLED in oned" in out
    assert "onemarket enable 100" in out
    assert out.splitlines()[-1] == "6 checks, 1 failed"
    url = f"http://127.0.0.1:{free_port()}/RPC2"
    monkeypatch.setenv("ONE_XMLRPC", url)
    code, _, err = run(capfd, "check", "100")
    assert code == 1
    assert f"cannot connect to oned at {url} (ONE_XMLRPC)" in one_line_error(err)


def test_s3_push_stopped_by_sighup_leaves_no_upload(tmp_path: Path, rgw) -> None:
    """A dropped ssh session during a multipart push (issue 13, 7): exit 129, one line, and
    neither an object nor an open multipart upload in the bucket."""
    bucket = f"cli-hup-{os.urandom(4).hex()}"
    market = s3_template(tmp_path, rgw, bucket, READ_LENGTH="5")
    client = raw_client(rgw)
    exe = Path(sys.executable).parent / "one-market"
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [exe, "push", market, str(fifo), "--id", "9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )

    def uploads() -> list:
        try:
            return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        except client.exceptions.NoSuchBucket:
            return []

    with open_writer(fifo, proc) as writer:
        writer.write(os.urandom(6 * MIB))  # more than one 5 MiB part: a multipart upload
        writer.flush()
        out, err = signal_when(proc, uploads, "a multipart upload", signal.SIGHUP)
    assert proc.returncode == cli.EXIT_HANGUP, err
    last = err.decode().splitlines()[-1]  # after the backend's INFO lines
    assert last == "one-market: push stopped by SIGHUP (its terminal or ssh session closed)"
    assert out == b""
    assert uploads() == []
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
