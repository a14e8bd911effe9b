"""The drivers' attribute tables: one parser, and the README's tables show the same rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from onemarket.action import Market
from onemarket.backends.attributes import Attr, read
from onemarket.errors import ConfigError
from onemarket.registry import DRIVERS, backend_class

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rows(driver: str) -> dict[str, tuple[str, str]]:
    """Attribute name -> (default cell, its share for rows naming several) of a driver's table."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"### `{driver}`", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z_0-9]+)`", cells[0]) if line.startswith("| `") else []
        shares = cells[1].split(" / ") if len(names) > 1 else [cells[1]] if names else []
        for i, name in enumerate(names):
            rows[name] = (cells[1], shares[i] if len(shares) == len(names) else cells[1])
    return rows


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_readme_tables_match_the_drivers_attributes(driver: str) -> None:
    table = backend_class(driver).attributes
    rows = readme_rows(driver)
    assert sorted(rows) == sorted(a.name for a in table)
    for attr in table:
        cell, share = rows[attr.name]
        assert ("required" in cell) is attr.required, attr.name
        if attr.default is not None and not attr.required:
            assert share.strip("`").strip() == attr.default, attr.name


def test_one_parser_defaults_required_and_errors() -> None:
    table = [
        Attr("NEED", "x", required=True),
        Attr("N", "x", "3", parse=int),
        Attr("OPT", "x"),
    ]
    market = Market(1, "m", "t", {"NEED": " v ", "OPT": " "})
    assert read(market, table) == {"NEED": "v", "N": 3, "OPT": None}
    with pytest.raises(
        ConfigError, match=r"marketplace 'm' \(t\) is missing required attribute NEED"
    ):
        read(Market(1, "m", "t", {}), table)
    with pytest.raises(ConfigError, match="marketplace 'm': N invalid literal"):
        read(Market(1, "m", "t", {"NEED": "v", "N": "x"}), table)
