"""Android phones: the Adreno GPU through OpenCL, and the Arm CPU. Both build static `.tar` system
libraries that MLC's Android app links (`libmodel_android.a`)."""

import functools

import tvm

from mobilevlm_mlc.targets.cpu_kernels.schedule_rules import CpuKernelConfig

from .base import BuildTarget
from .cpu import CPU_KERNEL_RENAMES, cpu_numerics, cpu_pipeline
from .gpu import gpu_pipeline

# dlight's own Adreno matmul config unrolls by 16; the GEMV / reduction rules' 256 is capped to match.
ADRENO_MAX_UNROLL_STEP = 16

ANDROID_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a78"}

# 32 NEON registers of 4 fp32: a 16-lane vector is 4 of them, so fewer accumulators than on AVX-512
# (GEMM 4 rows x 1 vector = 16 registers; GEMV 4 vectors = 16, one NK64 tile). Not measured on a phone.
NEON_KERNELS = CpuKernelConfig(gemm_rows=4, gemm_column_vectors=1, prefetch_kv_pages=False)

ANDROID_ADRENO = BuildTarget(
    name="android-adreno",
    description="Adreno GPU via OpenCL (qcom/adreno-opencl, 512 threads), host aarch64-linux-android, .tar system lib",
    make_target=lambda: tvm.target.Target(
        {**tvm.target.Target("qcom/adreno-opencl").export(), "max_num_threads": 512, "max_threads_per_block": 512},
        host=ANDROID_HOST,
    ),
    default_quantization="q4f16_0",
    quantizations=("q4f16_0", "q4f16_1", "q0f16", "q4f32_1", "q0f32"),  # fp32 ones: PoCL conformance builds
    pipeline=functools.partial(gpu_pipeline, max_unroll_step=ADRENO_MAX_UNROLL_STEP),
    codegen="opencl",
    system_lib=True,
    float64=False,  # Adreno's OpenCL has no cl_khr_fp64
)

ANDROID_CPU = BuildTarget(
    name="android-cpu",
    description="Arm CPU (LLVM aarch64-linux-android, cortex-a78: NEON, dotprod, fp16), .tar system lib",
    make_target=lambda: tvm.target.Target(ANDROID_HOST),
    default_quantization="q4f16_3",
    quantizations=("q4f16_3", "q4f32_3", "q4f16_1", "q4f32_1", "q0f16", "q0f32"),
    pipeline=functools.partial(cpu_pipeline, config=NEON_KERNELS),
    codegen="llvm",
    numerics=cpu_numerics,
    kernel_renames=CPU_KERNEL_RENAMES,
    system_lib=True,
)
