"""Build configurations, one module per deployment target. `get_target(name)` looks one up."""

from __future__ import annotations

from .android import ANDROID_ADRENO, ANDROID_CPU
from .base import BuildTarget, KernelCheckError
from .cpu import HOST_CPU
from .cuda import CUDA, ORIN_CUDA
from .vulkan import VULKAN

TARGETS: dict[str, BuildTarget] = {t.name: t for t in (HOST_CPU, ANDROID_CPU, ANDROID_ADRENO, ORIN_CUDA, CUDA, VULKAN)}


def get_target(name: str) -> BuildTarget:
    if name not in TARGETS:
        raise KeyError(f"unknown target '{name}' (expected one of {', '.join(TARGETS)})")
    return TARGETS[name]


__all__ = ["TARGETS", "BuildTarget", "KernelCheckError", "get_target"]
