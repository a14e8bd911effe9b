"""OpenNebula marketplace drivers in Python: the MAD, its actions and their backends."""

__version__ = "0.1.0"
