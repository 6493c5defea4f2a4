"""Build configurations, one module per deployment target. `get_target(name)` looks one up."""

from __future__ import annotations

from .base import BuildTarget
from .cpu import HOST_CPU

TARGETS: dict[str, BuildTarget] = {t.name: t for t in (HOST_CPU,)}


def get_target(name: str) -> BuildTarget:
    if name not in TARGETS:
        raise KeyError(f"unknown target '{name}' (expected one of {', '.join(TARGETS)})")
    return TARGETS[name]


__all__ = ["TARGETS", "BuildTarget", "get_target"]
