"""Readers of public appliance catalogs (monitor only)."""
