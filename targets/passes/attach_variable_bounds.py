"""`attach_variable_bounds`: upper bounds of the entry points' symbolic sizes (tokens per prefill chunk,
sequences per batch), as MLC's `AttachVariableBounds` sets them. TVM's memory planner then gives every
intermediate a static buffer of its largest size, allocated once; the sizes of those buffers are what
`_metadata.memory_usage` reports (MLC's engine subtracts its maximum from the memory it gives the KV
cache)."""

from __future__ import annotations

import tvm
from tvm import relax


def attach_variable_bounds(mod: tvm.IRModule, bounds: dict[str, int]) -> tvm.IRModule:
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = func.with_attr("tir_var_upper_bound", bounds).with_attr("tir_non_negative_var", ["vocab_size"])
    return mod
