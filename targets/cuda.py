"""NVIDIA GPUs through CUDA: desktop / server cards (x86-64 host) and Jetson Orin (AArch64 Linux host).

Kernels are compiled ahead of time and embedded in the library, so the GPU machine loads them with the
driver alone: `cuda` with the build machine's nvcc (a fatbin, `toolchain/nvcc.py`), `orin-cuda` with
NVRTC 12.2 from PyPI (an sm_87 cubin every JetPack 6 driver loads, `toolchain/nvrtc.py`). Orin's library
is cross-linked on this machine with Debian's `g++-aarch64-linux-gnu`.
"""

import tvm

from mobilevlm_mlc.targets.toolchain.nvcc import NvccDeviceCode
from mobilevlm_mlc.targets.toolchain.nvrtc import NvrtcDeviceCode

from .base import BuildTarget
from .gpu import gpu_pipeline

QUANTIZATIONS = ("q4f16_1", "q4f32_1", "q0f16", "q0f32")

CUDA = BuildTarget(
    name="cuda",
    description="NVIDIA GPU, CUDA sm_80 + sm_90 SASS (+ compute_90 PTX), nvcc ahead of time, x86-64 host, shared library",
    make_target=lambda: tvm.target.Target(
        {"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024},
        host={"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"},
    ),
    default_quantization="q4f16_1",
    quantizations=QUANTIZATIONS,
    pipeline=gpu_pipeline,
    codegen="cuda",
    device_code=NvccDeviceCode(archs=("sm_80", "sm_90")),
    device="cuda",
)

ORIN_CUDA = BuildTarget(
    name="orin-cuda",
    description="Jetson Orin GPU, CUDA sm_87 cubin (NVRTC 12.2 from PyPI, JetPack 6), host aarch64-linux-gnu cortex-a78, shared library",
    make_target=lambda: tvm.target.Target("nvidia/jetson-agx-orin-32gb"),
    default_quantization="q4f16_1",
    quantizations=QUANTIZATIONS,
    pipeline=gpu_pipeline,
    codegen="cuda",
    device_code=NvrtcDeviceCode(archs=("sm_87",), driver="12.2", driver_name="JetPack 6.0"),
    device="cuda",
    linker="aarch64-linux-gnu-g++",
    linker_package="Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu",
)
