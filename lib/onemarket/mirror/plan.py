"""What a mirror run fetches, decided with the catalog readers' own code.

The SOURCE marketplace's driver picks the catalog kind: ``one`` (:mod:`.one`) or
``linuxcontainers`` (:mod:`.simplestreams`). Either reads and filters the catalog exactly as
its driver does, so the mirror holds what the driver would publish, no more, and returns a
:class:`~.model.Plan`.
"""

from __future__ import annotations

import requests

from .. import driverlog
from ..action import Market
from ..catalogs.linuxcontainers import DRIVER as LXC_DRIVER
from ..errors import ConfigError
from ..installation import Installation
from . import one, simplestreams
from .model import Plan, Selection

PLANNERS = {"one": one.plan, LXC_DRIVER: simplestreams.plan}


def make_plan(
    market: Market, session: requests.Session, installation: Installation, selection: Selection
) -> Plan:
    planner = PLANNERS.get(market.driver)
    if planner is None:
        raise ConfigError(
            f"marketplace '{market.name}' has MARKET_MAD={market.driver}: only the public "
            "catalogs one and linuxcontainers can be mirrored"
        )
    plan = planner(market, session, installation, selection)
    for warning in plan.warnings:
        driverlog.warn(warning)
    return plan
