"""An IMPORT whose copy runs beside the datastore export (workflow.overlap_guess).

The fs export prints the image's own SOURCE as IMPORT_SOURCE when the datastore has no
BRIDGE_LIST (one-7.4:src/datastore_mad/remotes/fs/export:52,77,89); these exports behave like
it, and each waits until our copy's temporary file exists, so the overlap is shown by order,
never by timing. Whatever the export says, nothing is published before its answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from onemarket.action import ImportInfo, decode_action
from onemarket.workflow import ExportAnswer, ExportDeclined, confirms, overlap_guess

from tests.backends.test_s3 import (
    market_attrs,
    new_bucket,
    object_exists,
    raw_client,
    uploads_left,
)
from tests.payloads import app_xml, datastore_xml, image_xml, import_payload
from tests.servers.oned import OneLocation
from tests.servers.rgw import CephRgw
from tests.test_mad import wait_for
from tests.test_mad_lifecycle import files_in, mad_family, uploads_open, wait_gone
from tests.waiting import until

FAKEDS = datastore_xml(ds_mad="fakeds")
IMAGE_BYTES = 3 * 1024 * 1024 + 5

EXPORT = """#!/bin/sh
cat > /dev/null
i=0
while [ $i -lt 1000 ]; do  # until our copy's temporary file is there (20 s at most)
  for f in "{public}"/.*.part; do [ -e "$f" ] && break 2; done
  sleep 0.02; i=$((i+1))
done
ls -A "{public}" > "{tmp}/seen-by-export"
{then}
sum=$(md5sum -- "{named}" | cut -d' ' -f1)
echo "<IMPORT_INFO><IMPORT_SOURCE><![CDATA[{named}]]></IMPORT_SOURCE><MD5>{md5}</MD5>\
<SIZE>3</SIZE><FORMAT>raw</FORMAT><DISPOSE>NO</DISPOSE></IMPORT_INFO>"
"""


def setup(oned: OneLocation, tmp: Path, named: str = "", md5: str = "$sum", then: str = ""):
    image = tmp / "image.raw"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    public = tmp / "public"
    public.mkdir()
    script = EXPORT.format(public=public, tmp=tmp, named=named or image, md5=md5, then=then)
    oned.add_datastore("fakeds", script)
    attrs = {"BASE_URL": "http://127.0.0.1:9/market", "PUBLIC_DIR": str(public)}
    payload = import_payload(
        "http",
        attrs,
        app=app_xml(id=31),
        image=image_xml(source=str(image), size_mb=3, format="raw"),
        datastore=FAKEDS,
    )
    return image, public, payload


def published(public: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in files_in(public)}


def test_copy_runs_beside_the_export_and_is_published_after_its_answer(
    oned: OneLocation, tmp_path: Path
) -> None:
    image, public, payload = setup(oned, tmp_path)
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    reply = mad.reply()
    assert reply.ok, reply
    seen = (tmp_path / "seen-by-export").read_text().split()
    assert len(seen) == 1 and seen[0].endswith(".part")  # copying, nothing published yet
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    assert f'MD5 = "{md5}"' in reply.decoded().decode()
    assert list(published(public).values()) == [image.read_bytes()]


def test_export_naming_another_source_gets_that_one_imported(
    oned: OneLocation, tmp_path: Path
) -> None:
    other = tmp_path / "converted.raw"
    other.write_bytes(b"another image" * 1000)
    _, public, payload = setup(oned, tmp_path, named=str(other))
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    reply = mad.reply()
    assert reply.ok, reply
    assert list(published(public).values()) == [other.read_bytes()]
    assert "the export named another source" in mad.log_text()


def test_failed_export_discards_the_copy(oned: OneLocation, tmp_path: Path) -> None:
    _, public, payload = setup(oned, tmp_path, then='echo "disk on fire" >&2; exit 3')
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    reply = mad.reply()
    assert not reply.ok
    assert "Error exporting image to file" in reply.info and "disk on fire" in reply.info
    assert files_in(public) == []


def test_export_md5_other_than_the_copy_fails_and_leaves_nothing(
    oned: OneLocation, tmp_path: Path
) -> None:
    _, public, payload = setup(oned, tmp_path, md5="0" * 32)
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    reply = mad.reply()
    assert not reply.ok and "MD5 mismatch" in reply.info, reply
    assert files_in(public) == []


@pytest.mark.parametrize("stop", ["finalize", "cancel"])
def test_stop_while_the_export_runs_leaves_nothing(
    oned: OneLocation, tmp_path: Path, stop: str
) -> None:
    hang = f"touch {tmp_path}/hung; i=0; while [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done"
    _, public, payload = setup(oned, tmp_path, then=hang)
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    wait_for(tmp_path / "hung")  # the export saw the copy's temporary file, and hangs
    family = mad_family(mad.pid)
    if stop == "finalize":
        assert mad.finalize() == 0
    else:
        mad.send("DRIVER_CANCEL 31")
        assert not mad.reply().ok
    wait_gone(family)
    assert files_in(public) == []


# ------------------------------------------------------------------------------------------
# the rules, one by one


def guess_for(tmp: Path, source: str = "", bridge_list: str = "") -> ImportInfo | None:
    template = {"BRIDGE_LIST": bridge_list} if bridge_list else None
    payload = import_payload(
        "http",
        {"BASE_URL": "http://127.0.0.1:9/", "PUBLIC_DIR": str(tmp)},
        image=image_xml(source=source, size_mb=7, format="qcow2"),
        datastore=datastore_xml(template=template),
    )
    return overlap_guess(decode_action(payload))


def test_only_an_absolute_source_without_bridge_list_is_guessed(tmp_path: Path) -> None:
    image = tmp_path / "img"
    assert guess_for(tmp_path, str(image)) == ImportInfo(str(image), size_mb=7, format="qcow2")
    assert guess_for(tmp_path, str(image), bridge_list="host1") is None  # export: ssh://host
    assert guess_for(tmp_path, "one/one-12") is None  # a Ceph SOURCE


@pytest.mark.parametrize("guessed", ["missing", "a-folder"])
def test_a_guess_that_cannot_be_read_costs_nothing(
    oned: OneLocation, tmp_path: Path, guessed: str
) -> None:
    """The MAD never stat()s the guess (a hung NFS mount would stall its loop): the copy
    fails in its own process, and the import runs on what the export named."""
    (tmp_path / "a-folder").mkdir()
    other = tmp_path / "exported.raw"
    other.write_bytes(b"exported image" * 999)
    public = tmp_path / "public"
    public.mkdir()
    oned.add_datastore(
        "fakeds",
        "#!/bin/sh\ncat > /dev/null\n"
        f"sum=$(md5sum -- '{other}' | cut -d' ' -f1)\n"
        f'echo "<IMPORT_INFO><IMPORT_SOURCE>{other}</IMPORT_SOURCE><MD5>$sum</MD5>'
        '<SIZE>1</SIZE><FORMAT>raw</FORMAT></IMPORT_INFO>"\n',
    )
    attrs = {"BASE_URL": "http://127.0.0.1:9/market", "PUBLIC_DIR": str(public)}
    source = str(tmp_path / guessed)
    payload = import_payload(
        "http", attrs, app=app_xml(id=31), image=image_xml(source=source), datastore=FAKEDS
    )
    mad = oned.start("-m", "http")
    mad.request("IMPORT", 31, payload)
    reply = mad.reply()
    assert reply.ok, reply
    assert list(published(public).values()) == [other.read_bytes()]


def test_the_answer_is_sent_only_when_the_export_agrees() -> None:
    guess = ImportInfo("/d/img", size_mb=7, format="raw")
    same = ImportInfo("/d/img", md5="ab" * 16, size_mb=8, format="qcow2")
    assert json.loads(confirms(guess, same).answer) == {
        "md5": "ab" * 16, "size_mb": 8, "format": "qcow2"
    }  # fmt: skip
    declined = {
        "another source": ImportInfo("ssh://h:/d/img", md5="ab" * 16),
        "DISPOSE": ImportInfo("/d/img", md5="ab" * 16, dispose=True),
        "no MD5": ImportInfo("/d/img", md5=""),  # nothing to check against
        "one pipe write": ImportInfo("/d/img", md5="ab" * 16, format="x" * 5000),
    }
    for why, exported in declined.items():
        verdict = confirms(guess, exported)
        assert verdict.answer == b"" and why in verdict.declined


def test_export_answer_read_in_the_child() -> None:
    guess = ImportInfo("/d/img", size_mb=7, format="raw")
    for sent, expected in (
        (b'{"md5": "cd", "size_mb": 9, "format": "qcow2"}', ImportInfo("/d/img", "cd", 9, "qcow2")),
        (b"", None),
        (b"not json", None),
        (b'{"md5": "cd"}', None),
    ):
        r, w = os.pipe()
        os.write(w, sent)
        os.close(w)
        answer = ExportAnswer(r, guess)
        if expected is None:
            for _ in range(2):  # kept: the closed fd is never read again
                with pytest.raises(ExportDeclined):
                    answer()
        else:
            assert answer() == expected
            assert answer() == expected  # read once, kept


@pytest.mark.parametrize("md5", ["$sum", "0" * 32], ids=["confirmed", "mismatch"])
def test_s3_copy_runs_beside_the_export(
    oned: OneLocation, tmp_path: Path, rgw: CephRgw, md5: str
) -> None:
    """The s3 import claims its key and uploads while the export waits (for this test's 'go'),
    and completes the object only after the export's answer: a wrong MD5 leaves no object
    and no upload."""
    bucket, s3 = new_bucket(), raw_client(rgw)
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(12 * 1024 * 1024))
    go = tmp_path / "go"
    oned.add_datastore(
        "fakeds",
        "#!/bin/sh\ncat > /dev/null\n"
        f"i=0; while [ ! -e '{go}' ] && [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done\n"
        f"sum=$(md5sum -- '{image}' | cut -d' ' -f1)\n"
        f'echo "<IMPORT_INFO><IMPORT_SOURCE>{image}</IMPORT_SOURCE><MD5>{md5}</MD5>'
        '<SIZE>12</SIZE><FORMAT>raw</FORMAT></IMPORT_INFO>"\n',
    )
    payload = import_payload(
        "s3",
        market_attrs(rgw, bucket, READ_LENGTH="5"),
        app=app_xml(id=31),
        image=image_xml(source=str(image), size_mb=12, format="raw"),
        datastore=FAKEDS,
    )
    mad = oned.start("-m", "s3")
    mad.request("IMPORT", 31, payload)
    until(lambda: uploads_open(s3, bucket), "the upload to start beside the export")
    go.touch()
    reply = mad.reply()
    assert uploads_left(s3, bucket) == []
    if md5 == "$sum":
        assert reply.ok, reply
        body = s3.get_object(Bucket=bucket, Key="marketapp-31")["Body"].read()
        assert body == image.read_bytes()
    else:
        assert not reply.ok and "MD5 mismatch" in reply.info, reply
        assert not object_exists(s3, bucket, "marketapp-31")
