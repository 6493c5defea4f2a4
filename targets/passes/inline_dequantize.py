"""`InlineDequantize`: int4 weights unpacked inside the matmul's reduction, never into a temporary."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from mobilevlm_mlc.model_defs.quantization import DEQUANTIZE_BLOCK, QUANTIZED_MATMUL


@tvm.transform.module_pass(opt_level=0, name="InlineDequantize")
def inline_dequantize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Inline the `dequantize` stage of every (fused) quantized matmul into its consumer, so int4 weights
    are unpacked inside the reduction instead of into a full-precision temporary.

    For targets without a schedule rule that does this (GPU dlight GEMV / Matmul rules inline it)."""
    updates = {}
    for gv, func in mod.functions_items():
        if (
            not isinstance(func, tirx.PrimFunc)
            or QUANTIZED_MATMUL not in gv.name_hint
            or func.attrs.get("tirx.is_scheduled")
        ):
            continue  # a scheduled kernel has placed its dequantize already (the CPU GEMM tiles it)
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        for block in sch.get_child_blocks(root):
            if sch.get(block).name_hint.startswith(DEQUANTIZE_BLOCK):
                sch.compute_inline(block)
        updates[gv] = sch.mod["main"]
    for gv, func in updates.items():
        mod[gv] = func
    return mod
