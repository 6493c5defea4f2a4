"""Android phones: the Adreno GPU through OpenCL, and the Arm CPU. Both build static `.tar` system
libraries that MLC's Android app links (`libmodel_android.a`)."""

import functools

import tvm

from mobilevlm_mlc.targets.cpu_kernels.schedule_rules import CpuKernelConfig

from .base import ArmCpu, BuildTarget
from .cpu import CPU_KERNEL_RENAMES, cpu_numerics, cpu_pipeline
from .gpu import gpu_pipeline

# dlight's own Adreno matmul config unrolls by 16; the GEMV / reduction rules' 256 is capped to match.
ADRENO_MAX_UNROLL_STEP = 16

ANDROID_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a78"}

# phone cores (Snapdragon 888: 1 x Cortex-X1, 3 x A78, 4 x A55), all Armv8.2 with dotprod and fp16: QEMU's
# cortex-a76 has the same extensions
PHONE_CPUS = {
    "cortex-a78": ArmCpu("cortex-a78", "cortex-a76", "Snapdragon 888 / 8 Gen 1 performance cores"),
    "cortex-x1": ArmCpu("cortex-x1", "cortex-a76", "Snapdragon 888's prime core"),
    "cortex-a55": ArmCpu("cortex-a55", "cortex-a76", "efficiency cores of most phones since 2018"),
}

# 32 NEON registers of 4 fp32: a 16-lane vector is 4 of them, so fewer accumulators than on AVX-512
# (GEMM 4 rows x 1 vector = 16 registers; GEMV 4 vectors = 16, one NK64 tile). Not measured on a phone.
NEON_KERNELS = CpuKernelConfig(gemm_rows=4, gemm_column_vectors=1, prefetch=False)

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
    device="opencl",
    system_lib=True,
    float64=False,  # Adreno's OpenCL has no cl_khr_fp64
)

ANDROID_CPU = BuildTarget(
    name="android-cpu",
    description="Arm CPU of a phone (LLVM aarch64-linux-android, cortex-a78: NEON, dotprod, fp16), .tar system lib",
    make_target=lambda mcpu, mtriple=None: tvm.target.Target(
        {**ANDROID_HOST, "mcpu": mcpu, "mtriple": mtriple or ANDROID_HOST["mtriple"]}
    ),
    default_quantization="q4f16_3",
    quantizations=("q4f16_3", "q4f32_3", "q4f16_1", "q4f32_1", "q0f16", "q0f32"),
    pipeline=functools.partial(cpu_pipeline, config=NEON_KERNELS),
    codegen="llvm",
    numerics=cpu_numerics,
    kernel_renames=CPU_KERNEL_RENAMES,
    system_lib=True,  # so no 8-bit KV cache: its page views fail TVM 0.27's AttachGlobalSymbol (`int8_kv.py`)
    cpus=PHONE_CPUS,
    emulated_triple="aarch64-linux-gnu",  # the same code on glibc: `check-kernels --target android-cpu`
)
