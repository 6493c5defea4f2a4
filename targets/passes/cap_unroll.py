"""`CapUnroll`: unrolling bounded for device compilers that fail on long unrolled loops (Adreno)."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx


def cap_unroll(max_step: int) -> tvm.transform.Pass:
    """Limit every kernel's automatic unrolling to `max_step` and leave the unrolling to the device
    compiler (`#pragma unroll`) instead of expanding loops in the source: Adreno's OpenCL compiler fails
    `clBuildProgram` (CL_OUT_OF_HOST_MEMORY) on kernels unrolled too far (mlc-llm #2650, #2926)."""

    @tvm.transform.module_pass(opt_level=0, name="CapUnroll")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc):
                mod[gv] = _cap_unroll(func, max_step)
        return mod

    return transform


def _cap_unroll(func: tirx.PrimFunc, max_step: int) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    seen = set()
    pending = list(sch.get_child_blocks(sch.get_sblock("root"))) if _has_root(sch) else []
    while pending:
        block = pending.pop()
        pending.extend(sch.get_child_blocks(block))
        for loop in sch.get_loops(block):
            stmt = sch.get(loop)
            if stmt in seen:
                continue
            seen.add(stmt)
            step = stmt.annotations.get("pragma_auto_unroll_max_step")
            if step is not None and int(step) > max_step:
                sch.unannotate(loop, "pragma_auto_unroll_max_step")
                sch.annotate(loop, "pragma_auto_unroll_max_step", max_step)
            if int(stmt.annotations.get("pragma_unroll_explicit", 0)):
                sch.unannotate(loop, "pragma_unroll_explicit")
                sch.annotate(loop, "pragma_unroll_explicit", 0)
    return sch.mod["main"]


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001 (TVM raises its own error type for a missing block)
        return False
    return True
