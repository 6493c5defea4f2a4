"""`cpu`: this host, through LLVM with the host's own `mcpu` (a bare `llvm` target is generic x86-64)."""

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.target.codegen import target_has_features

from mobilevlm_mlc.model_defs.quantization import GroupQuantScheme, Layout
from mobilevlm_mlc.targets.cpu_kernels.int8_dot import int8_dot
from mobilevlm_mlc.targets.cpu_kernels.int8_matmul import replace_quantized_matmuls
from mobilevlm_mlc.targets.passes.inline_dequantize import inline_dequantize
from mobilevlm_mlc.targets.passes.vision_float32 import vision_in_float32

from .base import BuildTarget
from .cpu_kernels.attention import DECODE_ATTENTION, replace_attention
from .cpu_kernels.rope import replace_rope
from .cpu_kernels.schedule_rules import CpuKernelConfig, schedule_cpu_kernels
from .cpu_kernels.silu import legalize_silu
from .passes.mark_no_alias import mark_no_alias

# x86 register blocking by vector width; Arm's is `android.NEON_KERNELS`
AVX512_KERNELS = CpuKernelConfig()  # 32 zmm: GEMM 6 rows x 2 vectors of 16, GEMV 4 vectors of 16 rows
AVX2_KERNELS = CpuKernelConfig(lanes=8, gemv_row_vectors=8)  # 16 ymm: GEMM 6 x 2 of 8 (12 accumulators)


def x86_kernels(target: tvm.target.Target) -> CpuKernelConfig:
    """The tiling for the CPU's widest vectors: AVX-512's 32 x 512-bit registers, else AVX2's 16 x 256-bit
    (16-lane vectors there would be split by LLVM into pairs: 24 accumulators for 16 registers)."""
    return AVX512_KERNELS if target_has_features("avx512f", target) else AVX2_KERNELS


def fp16_arithmetic(target: tvm.target.Target) -> bool:
    """The CPU computes in fp16 natively (AArch64 `fullfp16`, x86 AVX512-FP16); otherwise an fp16 model's
    vision tower runs in fp32 (`vision_float32`)."""
    return bool(target_has_features("fullfp16", target) or target_has_features("avx512fp16", target))


def cpu_numerics(target: tvm.target.Target, dtype: str, scheme: GroupQuantScheme | None) -> dict:
    """What a CPU library records about its arithmetic: the activations of its quantized matmuls
    (`replace_quantized_matmuls` takes exactly the NK64 ones: q4f32_3, q4f16_3), and the dtype its vision
    tower computes in."""
    dot = int8_dot(target)
    int8 = dot is not None and scheme is not None and scheme.layout is Layout.NK64
    return {
        "quantized_matmul_activations": "int8" if int8 else "model dtype",
        "int8_dot_product": dot.name if int8 else None,
        "vision_compute_dtype": "float32" if dtype == "float16" and not fp16_arithmetic(target) else dtype,
    }


def cpu_pipeline(
    target: tvm.target.Target, config: CpuKernelConfig | None = None, int8_kv: bool = False
) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our passes: `x @ W.T` folded into one matmul (W^T never materialized),
    every kernel scheduled for threads and SIMD, dequantize inlined into any quantized matmul no rule
    took, and the KV cache's attention kernels replaced by parallel, vectorized ones. Softmax uses TOPI's
    polynomial exp (vectorizes; libm's `expf` does not): the vision tower's softmax took 400 ms of a
    2.5 s image encode. With an int8 dot product (AVX-512 VNNI, AVX-VNNI or AVX2: `int8_dot`), NK64
    (q4f32_3, q4f16_3) quantized matmuls run on int8 activations; without fp16 arithmetic, an fp16 model's vision tower computes in fp32.
    `int8_kv`: the KV cache stores K and V in 8 bits (`cpu_kernels/int8_kv.py`)."""
    config = config or x86_kernels(target)
    dot = int8_dot(target)
    int8 = [replace_quantized_matmuls(dot, config.prefetch)] if dot else []
    vision = [] if fp16_arithmetic(target) else [vision_in_float32]
    return tvm.transform.Sequential(
        vision
        + int8
        + [
            relax.transform.FuseTransposeMatmul(),
            relax.transform.FastMathTransform(),
            replace_attention(config.prefetch, int8_kv),
            replace_rope,
        ]
        + cpu_generic.library_dispatch_passes(target)
        + [relax.transform.LegalizeOps({"relax.nn.silu": legalize_silu})]  # the rest as TVM's, below
        + cpu_generic.legalize_passes(target)
        + [schedule_cpu_kernels(config), inline_dequantize, mark_no_alias]
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target)
    )


# the kernels `cpu_pipeline` swaps in: our decode attention, TOPI's fast softmax
CPU_KERNEL_RENAMES = {"batch_decode_paged_kv": DECODE_ATTENTION, "softmax": "fast_softmax"}

HOST_CPU = BuildTarget(
    name="cpu",
    description="this machine's CPU (LLVM, host mcpu), shared library",
    make_target=lambda: tvm.target.Target.from_device(tvm.cpu()),
    default_quantization="q4f16_3",
    quantizations=("q4f16_3", "q4f32_3", "q0f32", "q0f16", "q4f16_1", "q4f32_1", "q4f16_0"),
    pipeline=cpu_pipeline,
    codegen="llvm",
    numerics=cpu_numerics,
    kernel_renames=CPU_KERNEL_RENAMES,
    int8_kv_cache=True,
)
