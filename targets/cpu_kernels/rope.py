"""The KV cache's RoPE for CPUs, and `ReplaceRope`, the pass that swaps it in for TVM's default one."""

from __future__ import annotations

import functools
import re

import tvm
from tvm import s_tir, tirx
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map
from tvm.script import tirx as T


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def rope(theta: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str) -> tirx.PrimFunc:
    """The KV cache's `fused_rope` (split q/k/v, rotate q and k; TVM's `llama_rope_with_position_map`
    without scaling), same signature and arithmetic, with each token's cosines and sines computed once
    instead of once per head and element: TVM's calls `pow`, `cos` and `sin` from libm for every element
    of every q/k head (none vectorizes), 6.5 ms of a 272-token prefill layer."""
    D, half, H_q, H_kv = head_dim, head_dim // 2, num_q_heads, num_kv_heads

    @T.macro
    def rotate(qkv, s, h, out, out_h, cos_f, sin_f, apply_rope):
        for d in T.vectorized(half):
            out[s, out_h, d] = T.if_then_else(
                apply_rope > 0,
                T.Cast(
                    dtype,
                    cos_f[d] * T.Cast("float32", qkv[s, h, d]) + sin_f[d] * -T.Cast("float32", qkv[s, h, d + half]),
                ),
                qkv[s, h, d],
            )
            out[s, out_h, d + half] = T.if_then_else(
                apply_rope > 0,
                T.Cast(
                    dtype,
                    cos_f[d] * T.Cast("float32", qkv[s, h, d + half]) + sin_f[d] * T.Cast("float32", qkv[s, h, d]),
                ),
                qkv[s, h, d + half],
            )

    # fmt: off
    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, H_q + 2 * H_kv, D), dtype)
        q = T.match_buffer(var_q, (seq_len, H_q, D), dtype)
        k = T.match_buffer(var_k, (seq_len, H_kv, D), dtype)
        v = T.match_buffer(var_v, (seq_len, H_kv, D), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads()
                T.writes()
                cos_f = T.sblock_alloc_buffer((half,), "float32")
                sin_f = T.sblock_alloc_buffer((half,), "float32")
                for d in T.serial(half):
                    freq: T.let[T.float32] = T.Cast("float32", position_map[s]) / T.pow(T.float32(theta), T.Cast("float32", d * 2) / T.float32(D))
                    cos_f[d] = T.cos(freq)
                    sin_f[d] = T.sin(freq)
                for h in T.serial(H_q):
                    rotate(qkv, s, h, q, h, cos_f, sin_f, apply_rope)
                for h in T.serial(H_kv):
                    rotate(qkv, s, H_q + h, k, h, cos_f, sin_f, apply_rope)
                    for d in T.vectorized(D):
                        v[s, h, d] = qkv[s, H_q + H_kv + h, d]
    # fmt: on

    return fused_rope


_POW_BASE = re.compile(r"T\.pow\(T\.float32\(([-+0-9.e]+)\)")


def faster_rope(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """`rope` for a kernel that is exactly TVM's unscaled default RoPE, else None: heads and dtype come
    from its block's outputs, theta from its `pow`, and TVM's kernel regenerated from them must equal
    it structurally; any other variant (scaled, llama3, longrope, partial rotary) stays TVM's."""
    sch = s_tir.Schedule(func)
    try:
        block = sch.get(sch.get_sblock("llama_fused_rope"))
    except s_tir.ScheduleError:
        return None
    outputs = {region.source.name: region.source for region in block.writes}
    theta = _POW_BASE.search(func.script())
    if theta is None or set(outputs) != {"q", "k", "v"}:
        return None
    q, k = outputs["q"], outputs["k"]
    heads, kv_heads, dim, dtype = int(q.shape[1]), int(k.shape[1]), int(q.shape[2]), str(q.dtype)
    try:
        tvm.ir.assert_structural_equal(func, _tvm_rope(float(theta.group(1)), dim, heads, kv_heads, str(dtype)))
    except ValueError:
        return None
    return rope(float(theta.group(1)), dim, heads, kv_heads, dtype)


@functools.cache
def _tvm_rope(theta: float, dim: int, heads: int, kv_heads: int, dtype: str) -> tirx.PrimFunc:
    """TVM's own unscaled RoPE kernel for these sizes, the one `faster_rope` replaces."""
    return llama_rope_with_position_map(theta, 1.0, dim, heads, kv_heads, dtype, {}, dim)


@tvm.transform.module_pass(opt_level=0, name="ReplaceRope")
def replace_rope(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Swap the KV cache's RoPE kernel for `rope` where it is TVM's unscaled default (`faster_rope`)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc):
            faster = faster_rope(func)
            if faster is not None:
                mod[gv] = faster
    return mod
