"""The GPU pipeline shared by the OpenCL, CUDA and Vulkan targets: MLC's dlight rules schedule every
kernel, then each kernel is checked against the target's limits before code generation."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.gpu_generic import pipeline as gpu_generic

from .passes.cap_unroll import cap_unroll
from .passes.schedule_gpu_kernels import schedule_gpu_kernels
from .passes.verify_gpu_kernels import verify_gpu_kernels


def gpu_pipeline(target: tvm.target.Target, max_unroll_step: int | None = None) -> tvm.transform.Pass:
    """MLC's GPU lowering; `max_unroll_step` caps unrolling for device compilers that choke on it."""
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul()]
        + gpu_generic.library_dispatch_passes(target)
        + [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            schedule_gpu_kernels(target),
            *([cap_unroll(max_unroll_step)] if max_unroll_step else []),
            verify_gpu_kernels(target),
        ]
        + gpu_generic.dataflow_lower_passes(target)
        + gpu_generic.finalize_passes(target)
    )
