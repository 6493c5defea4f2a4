"""NVIDIA GPUs through CUDA: desktop / server cards from an x86-64 host.

TVM 0.27 embeds the kernels' CUDA C in the library and compiles it when the library loads (NVRTC, or
nvcc with TVM_CUDA_COMPILE_MODE=nvcc), so the machine that runs it needs a CUDA toolkit; building the
device code ahead of time with nvcc is not done yet.
"""

import tvm

from .base import BuildTarget
from .gpu import gpu_pipeline

CUDA = BuildTarget(
    name="cuda",
    description="NVIDIA GPU, CUDA sm_80 (Ampere and newer; kernels JIT-compiled at load), x86-64 host, shared library",
    make_target=lambda: tvm.target.Target({"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": 49152}, host="llvm"),
    default_quantization="q4f16_1",
    quantizations=("q4f16_1", "q4f32_1", "q0f16", "q0f32"),
    pipeline=gpu_pipeline,
    codegen="cuda",
)
