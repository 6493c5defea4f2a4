"""Build configurations, one module per deployment target (`cpu`, `android`, `arm_linux`, `cuda`, `vulkan`, on `base`;
`gpu` is the pipeline the GPU ones share). `get_target(name)` looks one up. A target describes itself
(`BuildTarget.describe_build`, `kernel_renames`), so the CLI and the checks hold no per-target code.
`passes/`, `cpu_kernels/` and `toolchain/` are what the pipelines are made of. Imports `model_defs` only."""

from __future__ import annotations

from .android import ANDROID_ADRENO, ANDROID_CPU
from .arm_linux import ARM64_LINUX
from .base import ArmCpu, BuildTarget, KernelCheckError
from .cpu import HOST_CPU
from .cuda import CUDA, ORIN_CUDA
from .vulkan import VULKAN

TARGETS: dict[str, BuildTarget] = {
    t.name: t for t in (HOST_CPU, ANDROID_CPU, ANDROID_ADRENO, ARM64_LINUX, ORIN_CUDA, CUDA, VULKAN)
}


def get_target(name: str) -> BuildTarget:
    if name not in TARGETS:
        raise KeyError(f"unknown target '{name}' (expected one of {', '.join(TARGETS)})")
    return TARGETS[name]


__all__ = ["TARGETS", "ArmCpu", "BuildTarget", "KernelCheckError", "get_target"]
