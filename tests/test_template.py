"""Template writer and strict reader, cross-checked with an independent model of oned's lexer.

The model below is written from section 5 of the protocol reference and the rules of oned's
flex lexer (two states, longest match, first rule on ties, unmatched bytes dropped, text ends at
the first NUL). It works on bytes, as oned does, and shares no code with onemarket.template.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onemarket.errors import TemplateError
from onemarket.template import (
    Template,
    normalize_name,
    parse_template,
    quote,
    sanitize,
    write_attr,
    write_template,
)

# --------------------------------------------------------------------------- oned lexer model


class OnedAbort(Exception):
    """The model's parser gave up (what oned does on ``]]>`` or a syntax error)."""


_INITIAL = [
    ("COMMENT", re.compile(rb"[ \t]*#[^\n]*\n")),
    ("BLANK", re.compile(rb"[ \t\n]+")),
    ("VARIABLE", re.compile(rb"[A-Za-z0-9_]+")),
    ("EQUAL", re.compile(rb"[ \t]*=[ \t]*")),
    ("EQUAL_EMPTY", re.compile(rb"[ \t]*=[ \t]*\n")),
    ("COMMA", re.compile(rb"[ \t\n]*,[ \t\n]*")),
    ("CBRACKET", re.compile(rb"[ \t\n]*\][ \t\n]*")),
]
_VALUE = [
    ("OBRACKET", re.compile(rb"[ \t]*\[[ \t\n]*")),
    ("CCDATA", re.compile(rb".*\]\]>.*")),  # '.' stops at a newline, as in flex
    ("QUOTED", re.compile(rb'"(?:\\"|[^"])*"', re.DOTALL)),
    ("STRING", re.compile(rb"[^=# \t\n,\[\]]+")),
]


def oned_tokens(data: bytes) -> list[tuple[str, bytes]]:
    data = data.split(b"\0", 1)[0]
    tokens: list[tuple[str, bytes]] = []
    pos, rules = 0, _INITIAL
    while pos < len(data):
        best: tuple[str, bytes] | None = None
        for kind, rx in rules:
            m = rx.match(data, pos)
            if m and m.end() > pos and (best is None or len(m.group()) > len(best[1])):
                best = (kind, m.group())
        if best is None:
            pos += 1  # no rule matches: the byte is dropped
            continue
        kind, text = best
        pos += len(text)
        if kind in ("COMMENT", "BLANK"):
            continue
        tokens.append(best)
        if kind == "EQUAL":
            rules = _VALUE
        elif kind in ("OBRACKET", "CCDATA", "QUOTED", "STRING"):
            rules = _INITIAL
    return tokens


def _model_name(raw: bytes) -> str:
    name = raw.decode("ascii").upper()
    return "ONE_" + name if name[0].isdigit() or name.startswith("XML") else name


def _model_value(kind: str, raw: bytes) -> str:
    if kind == "QUOTED":
        raw = raw[1:-1]
    return raw.replace(b'\\"', b'"').decode("utf-8")


def oned_parse(text: str | bytes) -> list[tuple[str, object]]:
    """What oned stores for ``text``: (name, value or dict) pairs, or OnedAbort."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    toks = oned_tokens(data)
    out: list[tuple[str, object]] = []
    i = 0

    def take(*kinds: str) -> tuple[str, bytes]:
        nonlocal i
        if i >= len(toks) or toks[i][0] not in kinds:
            got = toks[i][0] if i < len(toks) else "end"
            raise OnedAbort(f"expected {kinds}, got {got}")
        i += 1
        return toks[i - 1]

    while i < len(toks):
        name = _model_name(take("VARIABLE")[1])
        kind, _ = take("EQUAL", "EQUAL_EMPTY")
        if kind == "EQUAL_EMPTY":
            out.append((name, ""))
            continue
        kind, raw = take("OBRACKET", "QUOTED", "STRING", "CCDATA")
        if kind == "CCDATA":
            raise OnedAbort("]]> in a value")
        if kind != "OBRACKET":
            out.append((name, _model_value(kind, raw)))
            continue
        vector: dict[str, str] = {}
        if toks[i : i + 1] and toks[i][0] == "CBRACKET":
            i += 1
        else:
            while True:
                key = _model_name(take("VARIABLE")[1])
                take("EQUAL")
                vkind, vraw = take("QUOTED", "STRING", "CCDATA")
                if vkind == "CCDATA":
                    raise OnedAbort("]]> in a vector value")
                vector.setdefault(key, _model_value(vkind, vraw))
                if take("COMMA", "CBRACKET")[0] == "CBRACKET":
                    break
        out.append((name, vector))
    return out


def test_model_sees_the_dangers_the_writer_avoids() -> None:
    # a final backslash swallows the closing quote: the next attribute breaks the whole parse
    assert oned_tokens(b'A = "x\\"\nB = "y"\n')[2] == ("QUOTED", b'"x\\"\nB = "')
    with pytest.raises(OnedAbort):
        oned_parse('A = "x\\"\nB = "y"\n')
    with pytest.raises(OnedAbort):
        oned_parse('A = "a]]>b"\n')
    assert oned_parse('A = "x"\0B = "y"\n') == [("A", "x")]
    assert oned_parse('a = "1"\n2b = "2"\nxml_c = "3"\n') == [
        ("A", "1"),
        ("ONE_2B", "2"),
        ("ONE_XML_C", "3"),
    ]
    assert oned_parse('V = [ K = "1", K = "2" ]\nE =\nW = [ ]\n') == [
        ("V", {"K": "1"}),
        ("E", ""),
        ("W", {}),
    ]
    # a bare word runs to the next blank, quotes included: longest match beats the quoted rule
    assert oned_parse('A = "x"y\n') == [("A", '"x"y')]


# --------------------------------------------------------------------------- expected values


def expected(value: str | bytes) -> str:
    """The documented sanitising rules, written independently of the module."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    text = text.replace("\0", "")
    text = text.replace("]]>", "]] >")
    if text.endswith("\\"):
        text += " "
    return text


HOSTILE = [
    '"',
    "\\",
    '\\"',
    "]]>",
    "]]",
    ">",
    "]",
    "[",
    "\n",
    "\r",
    "\r\n",
    "\0",
    "\t",
    "#",
    "=",
    ",",
    " ",
    "é",
    "\U0001f600",
    "\ud800",
    "\udcff",
    "\ufffd",
    "\x85",
    "\u2028",
]

hostile_text = st.lists(
    st.one_of(
        st.sampled_from(HOSTILE),
        st.text(max_size=8),
        st.characters(categories=["Cs"]),
    ),
    max_size=24,
).map("".join)
hostile_value = st.one_of(hostile_text, st.binary(max_size=64))
names = st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True).map(normalize_name)


def _check(attrs: list[tuple[str, object]], want: list[tuple[str, object]]) -> None:
    text = write_template(attrs)
    assert "\0" not in text
    text.encode("utf-8")  # no surrogate can reach the output
    assert oned_parse(text) == want
    assert parse_template(text).items == want
    assert parse_template(text.encode("utf-8")).items == want


@settings(max_examples=400, deadline=None)
@given(value=hostile_value)
def test_single_value_round_trips_or_is_sanitised(value: str | bytes) -> None:
    assert sanitize(value) == expected(value)
    _check(
        [("BEFORE", "b"), ("VALUE", value), ("AFTER", "a")],
        [
            ("BEFORE", "b"),
            ("VALUE", expected(value)),
            ("AFTER", "a"),
        ],
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(names, hostile_value), min_size=1, max_size=40))
def test_many_attributes_keep_their_names_and_values(pairs: list[tuple[str, object]]) -> None:
    _check(pairs, [(n, expected(v)) for n, v in pairs])  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(names, st.dictionaries(names, hostile_value, max_size=6)),
        min_size=1,
        max_size=8,
    ),
    hostile_value,
)
def test_vector_attributes_with_hostile_values(vectors: list, tail: object) -> None:
    attrs = [*vectors, ("TAIL", tail)]
    want = [(n, {k: expected(v) for k, v in d.items()}) for n, d in vectors]
    _check(attrs, [*want, ("TAIL", expected(tail))])  # type: ignore[arg-type]


def test_explicit_hostile_values() -> None:
    values = [
        "",
        "\\",
        "\\\\",
        'ends with a quote"',
        '\\"',
        '"\\',
        "]]>",
        "]]]>>",
        "]]\0>",
        "a]]>b]]>c",
        "line1\nline2\r\nline3\r",
        "\0\0\0",
        "tab\there",
        "# not a comment",
        "\n# not a comment either\n",
        'A = "injected"\nB = [ C = 1 ]',
        "é ü 日本語 \U0001f600",
        "lone \udc80 surrogate",
        "\ud83d\ude00",
    ]
    attrs = [(f"V{i}", v) for i, v in enumerate(values)]
    _check(attrs, [(f"V{i}", expected(v)) for i, v in enumerate(values)])
    _check(
        [("B", b"\xff\xfe bad \xc3( utf8 \x00 \\")],
        [("B", expected(b"\xff\xfe bad \xc3( utf8 \x00 \\"))],
    )


@pytest.mark.parametrize("filler", ["x", '"', "\\", "]]>", "\n", '\\"'])
def test_one_megabyte_values(filler: str) -> None:
    big = filler * (1_000_000 // len(filler)) + "\\"
    _check([("A", "a"), ("BIG", big), ("Z", "z")], [("A", "a"), ("BIG", expected(big)), ("Z", "z")])


def test_thousands_of_attributes() -> None:
    pairs = [(f"ATTR_{i}", f'value "{i}" \\') for i in range(5000)]
    text = write_template(pairs)
    parsed = parse_template(text)
    assert len(parsed.items) == 5000
    assert parsed.names() == [n for n, _ in pairs]
    assert parsed.get("ATTR_4999") == 'value "4999" \\ '
    assert len(oned_parse(text)) == 5000


def test_scalar_types_and_none() -> None:
    text = write_template([("A", 1), ("B", 2.5), ("C", True), ("D", False), ("E", None)])
    assert parse_template(text).as_dict() == {"A": "1", "B": "2.5", "C": "YES", "D": "NO"}
    assert quote('a"b') == '"a\\"b"'


def test_writer_refuses_names_oned_would_rewrite() -> None:
    for bad in ("lower", "1ABC", "XMLDATA", "WITH-DASH", "", "SPACE NAME", "É"):
        with pytest.raises(TemplateError):
            write_attr(bad, "x")
    with pytest.raises(TemplateError):
        write_attr("V", {"bad key": "x"})
    assert write_attr("ONE_1ABC", "x") == 'ONE_1ABC = "x"\n'


def test_empty_vector_and_empty_value() -> None:
    text = write_template([("EMPTY", {}), ("BLANK", ""), ("NEXT", "n")])
    assert oned_parse(text) == [("EMPTY", {}), ("BLANK", ""), ("NEXT", "n")]
    assert parse_template(text).items == [("EMPTY", {}), ("BLANK", ""), ("NEXT", "n")]


# --------------------------------------------------------------------------- strict reader


def test_reader_accepts_what_oned_accepts() -> None:
    text = (
        "# comment\n"
        "  # indented comment\n"
        "name = bare_word\n"
        '2nd = "x"\n'
        'xmlish = "y"\n'
        "EMPTY =\n"
        'V = [\n  a = "1",\n  B = bare,\n  a = "2" ]\n'
        'Q = "multi\nline \\" quote"\n'
    )
    want = [
        ("NAME", "bare_word"),
        ("ONE_2ND", "x"),
        ("ONE_XMLISH", "y"),
        ("EMPTY", ""),
        ("V", {"A": "1", "B": "bare"}),
        ("Q", 'multi\nline " quote'),
    ]
    assert parse_template(text).items == want
    assert oned_parse(text) == want


@pytest.mark.parametrize(
    "text",
    [
        'A = "unterminated\n',
        'A = "x\\"\n',
        'A = "a]]>b"\n',
        'A = "x"\0\n',
        'A = "x" B = "y"\n',
        '= "x"\n',
        'A "x"\n',
        'A = [ B = "1"\n',
        'A = [ B = "1" C = "2" ]\n',
        "A = [ B =\n ]\n",
        'A = \n "x"\n',
        'A-B = "x"\n',
        b'A = "\xff"\n',
    ],
)
def test_reader_rejects_broken_templates_with_one_line(text: str | bytes) -> None:
    with pytest.raises(TemplateError) as err:
        parse_template(text)
    assert "\n" not in str(err.value)


def test_template_accessors() -> None:
    t = parse_template('A = "1"\nV = [ X = "2" ]\nA = "3"\n')
    assert isinstance(t, Template)
    assert t.get("A") == "1"
    assert t.get("V") is None
    assert t.get("MISSING", "d") == "d"
    assert t.get_all("A") == ["1", "3"]
    assert t.get_all("V") == [{"X": "2"}]
    assert t.names() == ["A", "V", "A"]
    assert t.as_dict() == {"A": "1"}


def test_normalize_name() -> None:
    assert normalize_name("abc_1") == "ABC_1"
    assert normalize_name("9lives") == "ONE_9LIVES"
    assert normalize_name("Xml") == "ONE_XML"
    with pytest.raises(TemplateError):
        normalize_name("a.b")


template_soup = st.lists(
    st.sampled_from(
        [
            "A",
            "b",
            "1",
            "_",
            "xml",
            " ",
            "\t",
            "\n",
            "=",
            " = ",
            '"',
            '\\"',
            "\\",
            "[",
            "]",
            ",",
            "#",
            "]]>",
            "\r",
            "é",
            "\0",
            '"v"',
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=1500, deadline=None)
@given(template_soup)
def test_reader_accepts_nothing_that_oned_reads_differently(text: str) -> None:
    """The strict reader is a sound subset of oned's syntax."""
    try:
        mine = parse_template(text).items
    except TemplateError:
        return
    assert oned_parse(text) == mine


_blank = st.sampled_from(["", " ", "\t", "  ", "\n", " \n "])
_inner = st.lists(
    st.sampled_from(
        ["a", " ", '"', '\\"', "\\", "\n", "]]>", "]", "[", ",", "=", "#", "\r", "é", "\0"]
    ),
    max_size=8,
).map("".join)
_value = st.one_of(
    _inner.map(lambda s: f'"{s}"'),
    st.sampled_from(["x", "1.5", "a_b", 'x"y', "x\\", "a#b", "", "é", "a\rb"]),
)
_name = st.sampled_from(["A", "b", "2c", "xml", "N_1", "a-b"])
_pair = st.tuples(_name, _blank, _blank, _value).map(lambda t: f"{t[0]}{t[1]}={t[2]}{t[3]}")
_vector = st.tuples(
    _blank, st.lists(_pair, max_size=3), st.sampled_from([",", ", ", "\n,", ",\n", " "]), _blank
).map(lambda t: "[" + t[0] + t[2].join(t[1]) + t[3] + "]")
_attr = st.tuples(
    _name, _blank, _blank, st.one_of(_value, _vector), st.sampled_from(["\n", " \n", "", "\r\n"])
).map(lambda t: f"{t[0]}{t[1]}={t[2]}{t[3]}{t[4]}")
structured_templates = st.lists(
    st.one_of(_attr, st.sampled_from(["# c\n", "  #x\n", "\n", "#"])), max_size=6
).map("".join)


@settings(max_examples=1500, deadline=None)
@given(structured_templates)
def test_reader_agrees_with_oned_on_template_shaped_text(text: str) -> None:
    try:
        mine = parse_template(text).items
    except TemplateError:
        return
    assert oned_parse(text) == mine


def test_comments_after_values_as_oned_reads_them() -> None:
    """oned's lexer takes '#' to the end of the line as a comment anywhere outside a value."""
    text = 'NAME = "x" # the name\nB = word#rest\nV = [ A = "1", # first\n  C = "2" ]\n'
    assert oned_parse(text) == parse_template(text).items
    assert parse_template(text).items == [("NAME", "x"), ("B", "word"), ("V", {"A": "1", "C": "2"})]
