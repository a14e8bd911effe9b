"""OpenNebula template syntax: a writer that cannot produce a broken template, and a strict reader.

oned parses driver output with its template lexer (section 5 of the protocol reference). The
writer always double-quotes values and applies these documented sanitising rules, in order, to
text that the lexer cannot carry:

1. bytes that are not UTF-8, and lone surrogate code points in text (what ``surrogateescape``
   decoding leaves), become U+FFFD replacement characters;
2. NUL characters are removed (oned's parser stops reading at the first NUL);
3. every ``]]>`` becomes ``]] >`` (oned aborts the whole parse on ``]]>``);
4. a value ending with a backslash gets one space appended (the lexer has no escape for ``\\``,
   so a final backslash would swallow the closing quote).

Everything else, including quotes, newlines, CR, tabs and non-ASCII text, round-trips exactly:
``"`` is written as ``\\"`` and read back as ``"``. Each attribute starts on its own line and
every quoted value is followed by a newline, ``,`` or `` ]``, so that oned's longest-match rule
for bare words can never extend a value past its closing quote.

The reader accepts the subset of oned's syntax that the writer produces plus bare words and
comment lines, and follows oned where they differ from a naive reading: ``\\"`` is the only
escape, and inside a vector the first of two equal keys wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .errors import TemplateError

Value = str | dict[str, str]

_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_BAREWORD_RE = re.compile(r'[^\s=,\[\]#"]+')
_BLANKS = " \t\n"
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def sanitize(value: str | bytes | int | float | bool) -> str:
    """Apply the writer's sanitising rules (module docstring) to one value."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, bool):
        text = "YES" if value else "NO"
    else:
        text = str(value)
    text = _SURROGATE_RE.sub("\ufffd", text)
    text = text.replace("\x00", "")
    while "]]>" in text:
        text = text.replace("]]>", "]] >")
    if text.endswith("\\"):
        text += " "
    return text


def normalize_name(name: str) -> str:
    """The name oned stores for ``name``: upper-cased, ``ONE_`` before a digit or ``XML``."""
    if not _NAME_RE.fullmatch(name):
        raise TemplateError(f"invalid template attribute name {name!r}")
    upper = name.upper()
    if upper[0].isdigit() or upper.startswith("XML"):
        upper = "ONE_" + upper
    return upper


def quote(value: str | bytes | int | float | bool) -> str:
    """A sanitised value in double quotes, with ``"`` escaped."""
    return '"' + sanitize(value).replace('"', '\\"') + '"'


def _write_name(name: str) -> str:
    if normalize_name(name) != name:
        raise TemplateError(f"template attribute name {name!r} is not in oned's normal form")
    return name


def write_attr(name: str, value: Value | int | float | bool | bytes) -> str:
    """One attribute as template text (a vector when ``value`` is a mapping)."""
    if isinstance(value, Mapping):
        inner = ",\n  ".join(f"{_write_name(k)} = {quote(v)}" for k, v in value.items())
        return f"{_write_name(name)} = [\n  {inner} ]\n"
    return f"{_write_name(name)} = {quote(value)}\n"


def write_template(attrs: Iterable[tuple[str, object]]) -> str:
    """Template text for ``(name, value)`` pairs, in order; ``None`` values are left out."""
    return "".join(write_attr(n, v) for n, v in attrs if v is not None)  # type: ignore[arg-type]


@dataclass
class Template:
    """Parsed template: attributes in file order, names in oned's normal form."""

    items: list[tuple[str, Value]] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        """First single value of ``name``."""
        for n, v in self.items:
            if n == name and isinstance(v, str):
                return v
        return default

    def get_all(self, name: str) -> list[Value]:
        return [v for n, v in self.items if n == name]

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def as_dict(self) -> dict[str, str]:
        """Single values by name (the first of each); vectors left out."""
        out: dict[str, str] = {}
        for n, v in self.items:
            if isinstance(v, str):
                out.setdefault(n, v)
        return out


class _Reader:
    """Recursive-descent reader of the syntax oned accepts; anything else is an error."""

    def __init__(self, text: str) -> None:
        if "\x00" in text:
            raise TemplateError("template contains a NUL character")
        self.text = text
        self.pos = 0

    def error(self, what: str) -> TemplateError:
        line = self.text.count("\n", 0, self.pos) + 1
        return TemplateError(f"template syntax error at line {line}: {what}")

    def skip_blanks(self, newlines: bool = True, comments: bool = True) -> None:
        """Skip blanks and, between tokens (not where a value starts), ``#`` comments: oned's
        lexer takes ``#`` to the end of the line as a comment anywhere outside a value."""
        blanks = _BLANKS if newlines else " \t"
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in blanks:
                self.pos += 1
            elif ch == "#" and comments:
                end = self.text.find("\n", self.pos)
                if end < 0:  # oned only knows comments that end with a newline
                    raise self.error("comment without a final newline")
                self.pos = end
            else:
                break

    def name(self) -> str:
        m = _NAME_RE.match(self.text, self.pos)
        if not m:
            raise self.error("attribute name expected")
        self.pos = m.end()
        return normalize_name(m.group())

    def expect(self, ch: str) -> None:
        self.skip_blanks()
        if not self.text.startswith(ch, self.pos):
            raise self.error(f"{ch!r} expected")
        self.pos += 1

    def scalar(self) -> str:
        self.skip_blanks(comments=False)
        if self.text.startswith('"', self.pos):
            i = self.pos + 1
            out = []
            while True:
                j = self.text.find('"', i)
                if j < 0:
                    raise self.error("unterminated quoted value")
                if self.text[j - 1] == "\\":
                    out.append(self.text[i : j - 1] + '"')
                    i = j + 1
                    continue
                out.append(self.text[i:j])
                self.pos = j + 1
                break
            value = "".join(out)
        else:
            m = _BAREWORD_RE.match(self.text, self.pos)
            if not m:
                raise self.error("value expected")
            self.pos = m.end()
            value = m.group()
        if "]]>" in value:
            raise self.error("']]>' inside a value")
        return value

    def vector(self) -> dict[str, str]:
        self.pos += 1  # '['
        out: dict[str, str] = {}
        while True:
            self.skip_blanks()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            key = self.name()
            self.expect("=")
            self.skip_blanks(newlines=False, comments=False)
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("value expected in vector")
            out.setdefault(key, self.scalar())  # oned keeps the first of two equal keys
            self.skip_blanks()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("]", self.pos):
                raise self.error("',' or ']' expected in vector")

    def attrs(self) -> Iterator[tuple[str, Value]]:
        while True:
            self.skip_blanks()
            if self.pos >= len(self.text):
                return
            key = self.name()
            self.expect("=")
            self.skip_blanks(newlines=False, comments=False)
            if self.text.startswith("\n", self.pos):
                yield key, ""  # ``NAME =`` at the end of a line: oned's empty value
            elif self.text.startswith("[", self.pos):
                yield key, self.vector()
            else:
                yield key, self.scalar()
            self.skip_blanks(newlines=False)
            if self.pos < len(self.text) and self.text[self.pos] != "\n":
                raise self.error("end of line expected after value")


def parse_template(text: str | bytes) -> Template:
    """Strictly parse template text; raise TemplateError on anything oned would not accept."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TemplateError("template is not valid UTF-8") from exc
    return Template(list(_Reader(text).attrs()))
