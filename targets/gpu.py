"""The GPU pipeline shared by the OpenCL, CUDA and Vulkan targets: MLC's dlight rules schedule every
kernel, then each kernel is checked against the target's limits before code generation."""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.gpu_generic import pipeline as gpu_generic
from tvm.s_tir import dlight as dl

from .base import KernelCheckError
from .schedules import cap_unroll


_BINDING = re.compile(r'^( *)for .* in T\.thread_binding\((.+), thread="(\w+\.[xyz])"\)')


def inconsistent_thread_extents(func: tirx.PrimFunc, script: str | None = None) -> str | None:
    """A thread axis bound with two different extents inside one kernel, or None.

    Every loop bound to e.g. threadIdx.x in one kernel must have the launch's extent; a loop with a
    larger one silently covers only part of its range (dlight's GEMV rule does this to a broadcast
    epilogue: LDP's squeeze-excitation gate, found by `check-kernels`). Pass `script` when the caller
    already printed the function (printing a big kernel is not free)."""
    kernel_indent, extents = None, {}
    for line in (script or func.script()).splitlines():
        match = _BINDING.match(line)
        if not match:
            continue
        indent, extent, tag = len(match.group(1)), match.group(2), match.group(3)
        if tag.startswith("blockIdx") and (kernel_indent is None or indent <= kernel_indent):
            kernel_indent, extents = indent, {}  # the outermost binding of a new kernel
        if extents.setdefault(tag, extent) != extent:
            return f"{tag} bound with extents {extents[tag]} and {extent}"
    return None


class SimtMatmul(dl.gpu.Matmul):
    """dlight's Matmul rule without its CUDA tensor-core branch, which segfaults on the vision tower's fp16
    static-shape matmuls in TVM 0.27 (sm >= 70). The rule takes that branch from the target's `arch`
    alone, so it is shown a pre-Volta arch and schedules the SIMT way; this also keeps it from importing
    TVM's tensor-core intrinsics, a minute of TVMScript parsing per process."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if target.kind.name == "cuda":
            target = tvm.target.Target({**target.export(), "arch": "sm_60"})
        return super().apply(func, target, tunable)


def _schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """MLC's dlight rules; a kernel a rule schedules inconsistently is rescheduled without that rule
    (GEMV and Reduction both mis-bind LDP's gate epilogue; GeneralReduction schedules it right)."""
    rules = [SimtMatmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    retries = [[rules[0], *rules[2:]], [rules[0], *rules[3:]]]

    @tvm.transform.module_pass(opt_level=0, name="ScheduleGPUKernels")
    def schedule(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        original = dict(mod.functions_items())  # the pass may update `mod` in place
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            for fewer_rules in retries:
                if not inconsistent_thread_extents(mod[gv]):
                    break
                mod[gv] = dl.ApplyDefaultSchedule(*fewer_rules)(tvm.IRModule({gv: original[gv]}))[gv]
        return mod

    return schedule


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
            inconsistent = inconsistent_thread_extents(func, text)
            if inconsistent:
                raise KernelCheckError(f"kernel {gv.name_hint}: {inconsistent}")
            if not s_tir.analysis.verify_gpu_code(func, limits):
                raise KernelCheckError(f"kernel {gv.name_hint} exceeds the limits of {target.kind.name} ({limits})")
        return mod

    return verify


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
            _schedule(target),
            *([cap_unroll(max_unroll_step)] if max_unroll_step else []),
            _verify_kernels(target),
        ]
        + gpu_generic.dataflow_lower_passes(target)
        + gpu_generic.finalize_passes(target)
    )
