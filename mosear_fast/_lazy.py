"""Names a package exports but imports on first use (so importing it stays light)."""

from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from ``package.<table[name]>``."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
