"""Decode attention on the paged KV cache for CPUs.

TVM's CPU kernel (`batch_decode_paged_kv_cpu`) walks batch, heads, cached tokens and the head dimension
in nested scalar loops on one thread: 0.5 ms per layer at a 16-token context, growing 4.5 µs per
cached token (MobileLLaMA-1.4B shape) — as long as a whole layer's GEMVs at a few hundred tokens.
This kernel keeps its signature and semantics (online softmax in base 2, the log-sum-exp for merging)
and runs (sequence, head) pairs in parallel, the dot products and the value update in SIMD lanes.
`replace_decode_attention` swaps it into the module the KV cache was exported into.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

DECODE_ATTENTION = "batch_decode_paged_kv_cpu"  # the global symbol the KV cache calls


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int, page_size: int = 16) -> tirx.PrimFunc:
    """`batch_decode_paged_kv_cpu` without sliding window; rope must already be applied (the model
    uses `RopeMode.NORMAL`: q and k are rotated before the append, `rotary_mode` is 0)."""
    H_qo, D, group = num_qo_heads, head_dim, num_qo_heads // num_kv_heads
    chunks = D // lanes
    log2e = math.log2(math.e)

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                              page_table_values_handle: T.handle, var_length_info: T.handle,
                              k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                              output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": DECODE_ATTENTION})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, num_kv_heads, page_size, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_offset)
        assert rotary_mode == 0, "this decode attention takes keys already rotated (RopeMode.NORMAL)"

        for bh in T.parallel(B * H_qo):
            with T.sblock("attn"):
                T.reads()  # regions depend on the page table: declared opaque
                T.writes()
                q_local = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")  # running max, running sum, score, rescale
                b: T.let[T.int32] = bh // H_qo
                h: T.let[T.int32] = bh % H_qo
                begin: T.let[T.int32] = page_table_indptr[b]
                end: T.let[T.int32] = page_table_indptr[b + 1]
                kv_len: T.let[T.int32] = T.if_then_else(begin != end, (end - begin - 1) * page_size + length_info[b], 0)  # length_info[b]: tokens in the last page
                for d in T.vectorized(D):
                    q_local[d] = T.Cast("float32", Q[b, h, d]) * (sm_scale * T.float32(log2e))
                    acc[d] = T.float32(0)
                state[0] = T.float32(-5e4)
                state[1] = T.float32(1)
                for j in T.serial(kv_len):
                    page: T.let[T.int32] = page_table_values[begin + j // page_size]
                    slot: T.let[T.int32] = j % page_size
                    for lane in T.vectorized(lanes):
                        part[lane] = T.float32(0)
                    for c in T.serial(chunks):
                        for lane in T.vectorized(lanes):
                            part[lane] = part[lane] + q_local[c * lanes + lane] * T.Cast("float32", pages[page, 0, h // group, slot, c * lanes + lane])
                    state[2] = T.float32(0)
                    for lane in T.serial(lanes):
                        state[2] = state[2] + part[lane]
                    state[3] = T.exp2(state[0] - T.max(state[0], state[2]))  # rescale of what is summed so far
                    state[0] = T.max(state[0], state[2])
                    state[2] = T.exp2(state[2] - state[0])  # this token's weight
                    state[1] = state[1] * state[3] + state[2]
                    for d in T.vectorized(D):
                        acc[d] = acc[d] * state[3] + T.Cast("float32", pages[page, 1, h // group, slot, d]) * state[2]
                for d in T.vectorized(D):
                    output[b, h, d] = T.Cast(dtype, acc[d] / state[1])
                lse[b, h] = state[0] + T.log2(state[1])
    # fmt: on

    return batch_decode_paged_kv


def replace_decode_attention(lanes: int) -> tvm.transform.Pass:
    """Swap TVM's serial CPU decode attention for `decode_attention`, sized from the module's own."""

    @tvm.transform.module_pass(opt_level=0, name="ReplaceDecodeAttention")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and func.attrs.get("global_symbol") == DECODE_ATTENTION:
                (_, num_qo_heads, head_dim), pages = func.params[0].shape, func.params[1].shape
                mod[gv] = decode_attention(int(pages[2]), int(num_qo_heads), int(head_dim), func.params[0].dtype, lanes, int(pages[3]))
        return mod

    return transform
