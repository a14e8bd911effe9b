"""Maps a MARKET_MAD name to the backend class implementing it, imported on first use."""

from __future__ import annotations

import importlib

from .action import Market
from .backends.base import Backend, Context
from .errors import NotSupportedError

DRIVERS: dict[str, str] = {
    "http": "onemarket.backends.http_folder:HttpFolderBackend",
    "s3": "onemarket.backends.s3:S3Backend",
    "one": "onemarket.catalogs.opennebula:OpenNebulaCatalog",
    "linuxcontainers": "onemarket.catalogs.linuxcontainers:LinuxContainersCatalog",
}

ACTIONS = ("import", "delete", "monitor")


def backend_class(driver: str) -> type[Backend]:
    target = DRIVERS.get(driver)
    if target is None:
        raise NotSupportedError(f"Marketplace driver '{driver}' not available")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise NotSupportedError(
                f"marketplace driver '{driver}' is not built in this version of onemarket"
            ) from None
        raise NotSupportedError(
            f"marketplace driver '{driver}' needs the Python module '{exc.name}', "
            "which is not installed"
        ) from None
    return getattr(module, class_name)


def load_backend(driver: str, market: Market, context: Context) -> Backend:
    return backend_class(driver)(market, context)
