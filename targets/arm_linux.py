"""`arm64-linux`: Arm boards and servers running Linux (Jetson Orin's CPU, Raspberry Pi, AWS Graviton):
LLVM `aarch64-linux-gnu` with `android-cpu`'s CPU schedules (NEON-sized blocks, int8 `sdot` matmuls
where the core has dotprod), a shared library cross-linked with Debian's `g++-aarch64-linux-gnu`. Its
libraries also run here, under qemu-user (`mobilevlm_mlc/emulation`). `compile --cpu` picks the core."""

import dataclasses
import functools

import tvm

from .android import NEON_KERNELS
from .base import ArmCpu, BuildTarget
from .cpu import CPU_KERNEL_RENAMES, cpu_numerics, cpu_pipeline

ARM_LINUX_TRIPLE = "aarch64-linux-gnu"

# QEMU 7.2's models: cortex-a76 and neoverse-n1 have dotprod and fp16 (Armv8.2), cortex-a72 neither
BOARD_CPUS = {
    "cortex-a78": ArmCpu("cortex-a78", "cortex-a76", "Cortex-A78 class: Jetson Orin, phones' performance cores"),
    "orin": ArmCpu("cortex-a78ae", "cortex-a76", "NVIDIA Jetson Orin (Cortex-A78AE)"),
    "rpi5": ArmCpu("cortex-a76", "cortex-a76", "Raspberry Pi 5 (Cortex-A76)"),
    "rpi4": ArmCpu("cortex-a72", "cortex-a72", "Raspberry Pi 4 (Cortex-A72: Armv8.0, no dotprod, no fp16)"),
    "graviton2": ArmCpu("neoverse-n1", "neoverse-n1", "AWS Graviton2 (Neoverse N1)"),
    "graviton3": ArmCpu("neoverse-v1", "max", "AWS Graviton3 (Neoverse V1; QEMU 7.2 has no V1 model: -cpu max)"),
}

ARM64_LINUX = BuildTarget(
    name="arm64-linux",
    description="Arm CPU on Linux (LLVM aarch64-linux-gnu, --cpu preset, cortex-a78 default), shared library",
    make_target=lambda mcpu, mtriple=None: tvm.target.Target(
        {"kind": "llvm", "mtriple": mtriple or ARM_LINUX_TRIPLE, "mcpu": mcpu}
    ),
    default_quantization="q4f16_3",
    quantizations=("q4f16_3", "q4f32_3", "q4f16_1", "q4f32_1", "q0f16", "q0f32"),
    # Android's blocks; a shared library can keep the decode attention's KV page prefetch
    pipeline=functools.partial(cpu_pipeline, config=dataclasses.replace(NEON_KERNELS, prefetch=True)),
    codegen="llvm",
    numerics=cpu_numerics,
    kernel_renames=CPU_KERNEL_RENAMES,
    int8_kv_cache=True,
    linker="aarch64-linux-gnu-g++",
    linker_package="Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu",
    cpus=BOARD_CPUS,
    emulated_triple=ARM_LINUX_TRIPLE,
)
