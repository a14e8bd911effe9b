"""The one sweeper of temporary files killed writers left."""

from __future__ import annotations

import os
import time
from pathlib import Path

from onemarket.transfer.local import owner_tag, sweep_temps


def test_untagged_leftovers_go_by_age_and_only_with_the_prefix(tmp_path: Path) -> None:
    old, fresh, foreign = (tmp_path / n for n in (".app-3-aa.part", ".app-4-bb.part", ".o.part"))
    for p in (old, fresh, foreign):
        p.write_bytes(b"partial")
    for p in (old, foreign):
        os.utime(p, (time.time() - 7200,) * 2)
    assert sweep_temps(tmp_path, ".app-", max_age_s=3600) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".app-4-bb.part", ".o.part"]


def test_a_tag_of_a_live_writer_is_kept_whatever_its_age(tmp_path: Path) -> None:
    live = tmp_path / f".img.{owner_tag()}.abcd1234.part"
    live.write_bytes(b"x")
    os.utime(live, (time.time() - 7200,) * 2)
    assert sweep_temps(tmp_path, ".", max_age_s=3600) == []
    assert live.exists()
