"""Catalog VM templates (JSON objects) as OpenNebula template text.

OpenNebula's appliance catalogs carry the VM template of an appliance as a JSON object
(``opennebula_template``). oned wants template text, so each member becomes an attribute:

- a string or number becomes a single attribute (JSON ``true``/``false`` become ``YES``/``NO``);
- an object becomes a vector attribute ``NAME = [ K = "v", ... ]``;
- a list becomes the same attribute repeated, once per element (objects as vectors, strings and
  numbers as single attributes), as with several ``NIC`` or ``DISK``;
- vectors cannot nest in a template, so inside an object a list of strings or numbers is joined
  with commas and any other object or list is kept as compact JSON text;
- ``null``, empty strings, empty objects and empty lists are left out, as upstream does;
- names are written the way oned stores them (upper case, ``ONE_`` before a leading digit or
  ``XML``); a member whose name oned cannot hold (characters outside ``[A-Za-z0-9_]``) is left
  out and reported, as are a list nested directly in a list and a second member of one object
  with the same name in another case.

The text is produced by :mod:`onemarket.template`, so no value can break oned's parse.

Against the stock ``template_to_str`` (``src/market_mad/remotes/one/monitor``, one-6.10:225-244
and one-7.0:235-272, unchanged up to master): the same for what stock can write, that is
strings and objects of strings at the top level (names upper-cased, empty members left out;
7.0 adds arrays of objects as repeated vectors, commit 674025ef51). Stock interpolates values
without escaping, so a ``"`` in a value breaks its template, and it raises on a number or
boolean anywhere (``empty?``), losing the whole template, which the caller then leaves out;
6.10 drops arrays, 7.x writes an array of strings as ``KEY = [ "v" ]``, which oned cannot
parse. Ours writes all of these from the JSON's meaning: additions where stock set nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import TemplateError
from ..template import Value, normalize_name, write_template

Scalar = str | int | float | bool


@dataclass
class Converted:
    """The template text, and the members that could not be represented (by JSON path)."""

    text: str
    dropped: list[str] = field(default_factory=list)


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)


def _scalar_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


def _name(key: object, path: str, dropped: list[str]) -> str | None:
    try:
        return normalize_name(str(key))
    except TemplateError:
        dropped.append(path)
        return None


def _vector(obj: Mapping[object, object], path: str, dropped: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in obj.items():
        if _is_empty(value):
            continue
        name = _name(key, f"{path}.{key}", dropped)
        if name is None:
            continue
        if isinstance(value, Scalar):
            text = _scalar_text(value)
        elif isinstance(value, list) and all(isinstance(v, Scalar) for v in value):
            text = ",".join(_scalar_text(v) for v in value)
        else:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if name in out:
            dropped.append(f"{path}.{key}")
            continue
        out[name] = text
    return out


def template_attrs(doc: Mapping[object, object]) -> tuple[list[tuple[str, Value]], list[str]]:
    """``(name, value)`` pairs for the template writer, and the JSON paths left out."""
    attrs: list[tuple[str, Value]] = []
    dropped: list[str] = []
    for key, value in doc.items():
        if _is_empty(value):
            continue
        name = _name(key, str(key), dropped)
        if name is None:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{key}[{i}]" if isinstance(value, list) else str(key)
            if _is_empty(item):
                continue
            if isinstance(item, Mapping):
                vector = _vector(item, where, dropped)
                if vector:
                    attrs.append((name, vector))
            elif isinstance(item, Scalar):
                attrs.append((name, _scalar_text(item)))
            else:
                dropped.append(where)
    return attrs, dropped


def convert(doc: Mapping[object, object]) -> Converted:
    """The template text of a JSON VM template object (rules in the module docstring)."""
    attrs, dropped = template_attrs(doc)
    return Converted(write_template(attrs), dropped)
