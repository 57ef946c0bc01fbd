"""stoker: a node agent and CLI that keeps microVMs alive on one Linux host."""

__version__ = "0.1.0"
