"""Marketplace backends and the registry that maps a MARKET_MAD name to its class."""
