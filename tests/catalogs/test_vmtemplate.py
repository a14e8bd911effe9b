"""JSON VM template -> OpenNebula template text (catalogs/vmtemplate.py)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from onemarket.catalogs.vmtemplate import convert
from onemarket.template import parse_template


def parsed(doc: dict):
    return parse_template(convert(doc).text)


def test_scalars_nested_objects_and_lists():
    doc = {
        "CPU": "1",
        "vcpu": 2,
        "memory_resize": 1.5,
        "hot": True,
        "cold": False,
        "CONTEXT": {"NETWORK": "YES", "ssh_public_key": "$USER[SSH_PUBLIC_KEY]"},
        "NIC": [{"NETWORK": "a"}, {"NETWORK": "b", "MODEL": "virtio"}],
        "TAG": ["x", "y"],
        "FEATURES": {"LIST": [1, "two"], "DEEP": {"A": [1, {"B": 2}]}},
    }
    t = parsed(doc)
    assert t.items == [
        ("CPU", "1"),
        ("VCPU", "2"),
        ("MEMORY_RESIZE", "1.5"),
        ("HOT", "YES"),
        ("COLD", "NO"),
        ("CONTEXT", {"NETWORK": "YES", "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]"}),
        ("NIC", {"NETWORK": "a"}),
        ("NIC", {"NETWORK": "b", "MODEL": "virtio"}),
        ("TAG", "x"),
        ("TAG", "y"),
        ("FEATURES", {"LIST": "1,two", "DEEP": '{"A":[1,{"B":2}]}'}),
    ]
    assert convert(doc).dropped == []


def test_empty_values_are_left_out_as_upstream():
    doc = {
        "A": None,
        "B": "",
        "C": {},
        "D": [],
        "E": {"X": None, "Y": ""},
        "F": [None, "", {}],
        "G": {"X": "", "Y": "1"},
    }
    assert parsed(doc).items == [("G", {"Y": "1"})]


def test_names_as_oned_stores_them_and_unrepresentable_members_reported():
    doc = {
        "1st": "a",
        "xml_thing": "b",
        "bad-name": "c",
        "OS": {"ok": "1", "no good": "2", "OK": "dup"},
        "L": [["nested"], "fine"],
    }
    result = convert(doc)
    assert parse_template(result.text).items == [
        ("ONE_1ST", "a"),
        ("ONE_XML_THING", "b"),
        ("OS", {"OK": "1"}),
        ("L", "fine"),
    ]
    assert result.dropped == ["bad-name", "OS.no good", "OS.OK", "L[0]"]


HOSTILE = [
    'say "hi"',
    "ends with backslash \\",
    "close ]]> cdata",
    "multi\nline\ttext",
    "# not a comment",
    "a = [ b ]",
    "unicode ✓ é",
    "\\",
    '"',
]


def test_hostile_values_parse_and_round_trip():
    doc = {f"V{i}": s for i, s in enumerate(HOSTILE)}
    doc["VEC"] = {f"K{i}": s for i, s in enumerate(HOSTILE)}
    t = parsed(doc)
    for i, s in enumerate(HOSTILE):
        expected = s.replace("]]>", "]] >")
        if expected.endswith("\\"):
            expected += " "
        assert t.get(f"V{i}") == expected
        assert t.get_all("VEC")[0][f"K{i}"] == expected


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_any_json_object_gives_a_template_oned_parses(doc):
    result = convert(doc)
    parse_template(result.text)
    json.dumps(result.dropped)
