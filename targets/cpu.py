"""`cpu`: this host, through LLVM with the host's own `mcpu` (a bare `llvm` target is generic x86-64)."""

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from .base import BuildTarget
from .schedules import inline_dequantize


def cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our passes: `x @ W.T` folded into one matmul (W^T never materialized),
    and dequantize inlined into the quantized matmuls after fusion."""
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul()]
        + cpu_generic.library_dispatch_passes(target)
        + cpu_generic.legalize_passes(target)
        + [inline_dequantize]
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target)
    )


HOST_CPU = BuildTarget(
    name="cpu",
    description="this machine's CPU (LLVM, host mcpu), shared library",
    make_target=lambda: tvm.target.Target.from_device(tvm.cpu()),
    default_quantization="q4f16_1",
    quantizations=("q0f32", "q0f16", "q4f16_1", "q4f32_1", "q4f16_0"),
    pipeline=cpu_pipeline,
    codegen="llvm",
)
