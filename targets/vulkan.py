"""Vulkan (desktop GPUs, and Android GPUs through Vulkan), with MLC's attribute set."""

import tvm

from .base import BuildTarget
from .gpu import gpu_pipeline

VULKAN = BuildTarget(
    name="vulkan",
    description="Vulkan compute (SPIR-V), MLC's attributes, shared library",
    make_target=lambda: tvm.target.Target(
        {
            "kind": "vulkan",
            "max_threads_per_block": 256,
            "max_shared_memory_per_block": 32768,
            "thread_warp_size": 1,
            "supports_float16": True,
            "supports_int8": True,
            "supports_int16": True,
            "supports_int64": True,
            "supports_8bit_buffer": True,
            "supports_16bit_buffer": True,
            "supports_storage_buffer_storage_class": True,
        },
        host="llvm",
    ),
    default_quantization="q4f16_1",
    quantizations=("q4f16_1", "q4f32_1", "q0f16", "q0f32"),
    pipeline=gpu_pipeline,
    codegen="vulkan",
    device="vulkan",
    float64=False,  # shaderFloat64 is optional, and absent on most mobile GPUs
    provider="build TVM from source with USE_VULKAN=ON (and the Vulkan SDK / SPIR-V tools), as MLC's own TVM wheels are",
)
