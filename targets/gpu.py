"""The GPU pipeline shared by the OpenCL, CUDA and Vulkan targets: MLC's dlight rules schedule every
kernel, then each kernel is checked against the target's limits before code generation."""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.gpu_generic import pipeline as gpu_generic
from tvm.s_tir import dlight as dl

from .base import KernelCheckError


def _verify_kernels(target: tvm.target.Target) -> tvm.transform.Pass:
    limits = {
        "max_threads_per_block": int(target.attrs["max_num_threads"]),
        "max_shared_memory_per_block": int(target.attrs.get("max_shared_memory_per_block", 48 * 1024)),
    }

    @tvm.transform.module_pass(opt_level=0, name="VerifyGPUKernels")
    def verify(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            text = func.script()
            if "blockIdx" not in text and "threadIdx" not in text:
                raise KernelCheckError(f"kernel {gv.name_hint} is not bound to GPU threads (no schedule rule applied)")
            if not s_tir.analysis.verify_gpu_code(func, limits):
                raise KernelCheckError(f"kernel {gv.name_hint} exceeds the limits of {target.kind.name} ({limits})")
        return mod

    return verify


@tvm.transform.module_pass(opt_level=0, name="NoTensorCoreMatmul")
def no_tensor_core_matmul(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark every kernel `dlight.do_not_tensorize`: dlight's CUDA tensor-core Matmul rule (sm >= 70)
    segfaults on the vision tower's fp16 static-shape matmuls in TVM 0.27; its SIMT schedule is used."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
    return mod


def gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul()]
        + gpu_generic.library_dispatch_passes(target)
        + [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            *([no_tensor_core_matmul] if target.kind.name == "cuda" else []),
            dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
            _verify_kernels(target),
        ]
        + gpu_generic.dataflow_lower_passes(target)
        + gpu_generic.finalize_passes(target)
    )
