"""BRIDGE_LIST: the storage hosts reached over ssh, and which one serves an app.

Upstream picks ``hosts[app_id % len(hosts)]``. We do the same over the hosts oned does not
report disabled, offline or in error (when oned can be asked); without oned the list is used
as given. Host names come from the marketplace template and end up on an ssh command line, so
anything that could be read as an ssh option is refused.
"""

from __future__ import annotations

import re

from . import driverlog
from .errors import ConfigError, RemoteError

_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@%\[\]-]*")


def parse_bridge_list(text: str | None) -> list[str]:
    """Hosts of a BRIDGE_LIST attribute (space or comma separated), in order, de-duplicated."""
    hosts: list[str] = []
    for name in re.split(r"[\s,]+", text or ""):
        if not name:
            continue
        if not _HOST_RE.fullmatch(name):
            raise ConfigError(f"BRIDGE_LIST holds an invalid host name {name[:64]!r}")
        if name not in hosts:
            hosts.append(name)
    return hosts


def _usable(hosts: list[str]) -> set[str] | None:
    try:
        from .oneclient import usable_hosts
    except ImportError:
        return None
    return usable_hosts(hosts)


def available_hosts(hosts: list[str]) -> list[str]:
    """``hosts`` minus those oned reports disabled/offline/in error (all of them without oned)."""
    usable = _usable(hosts)
    if usable is None:
        return list(hosts)
    kept = [h for h in hosts if h in usable]
    skipped = [h for h in hosts if h not in usable]
    if skipped:
        driverlog.info(f"BRIDGE_LIST hosts skipped (disabled, offline or in error): {skipped}")
    if not kept:
        raise RemoteError(
            f"no usable host in BRIDGE_LIST: oned reports all of {', '.join(hosts)} "
            "disabled, offline or in error"
        )
    return kept


def host_for_app(hosts: list[str], app_id: int) -> str:
    """The host serving ``app_id``: ``hosts[app_id % len(hosts)]``, as upstream."""
    if not hosts:
        raise ConfigError("BRIDGE_LIST is empty")
    return hosts[app_id % len(hosts)]


def hosts_in_turn(hosts: list[str], start: int) -> list[str]:
    """Every host, beginning with ``hosts[start % len(hosts)]`` (for fall-back on failure)."""
    if not hosts:
        return []
    first = start % len(hosts)
    return hosts[first:] + hosts[:first]
