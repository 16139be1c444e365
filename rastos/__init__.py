"""Pieces shared by the image builder, the daemon and the hub."""

__version__ = "0.1.0"
