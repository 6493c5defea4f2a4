"""`ScheduleGPUKernels`: MLC's dlight rules, with a kernel they bind inconsistently rescheduled by fewer rules."""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from .verify_gpu_kernels import inconsistent_thread_extents


class SimtMatmul(dl.gpu.Matmul):
    """dlight's Matmul rule without its CUDA tensor-core branch, which segfaults on the vision tower's fp16
    static-shape matmuls in TVM 0.27 (sm >= 70). The rule takes that branch from the target's `arch`
    alone, so it is shown a pre-Volta arch and schedules the SIMT way; this also keeps it from importing
    TVM's tensor-core intrinsics, a minute of TVMScript parsing per process."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if target.kind.name == "cuda":
            target = tvm.target.Target({**target.export(), "arch": "sm_60"})
        return super().apply(func, target, tunable)


class GatherSafeReduction(dl.gpu.Reduction):
    """dlight's Reduction rule, declining (as a rule should) a reduction that has no dominant read: it
    asserts on one instead, e.g. the image resampler's taps, whose input index depends on a table. The
    rules after it take such a kernel (Fallback: one thread per output, the taps in a loop)."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        try:
            return super().apply(func, target, tunable)
        except AssertionError:
            return None


def schedule_gpu_kernels(target: tvm.target.Target) -> tvm.transform.Pass:
    """MLC's dlight rules; a kernel a rule schedules inconsistently is rescheduled without that rule
    (GEMV and Reduction both mis-bind LDP's gate epilogue; GeneralReduction schedules it right)."""
    rules = [SimtMatmul(), dl.gpu.GEMV(), GatherSafeReduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
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
