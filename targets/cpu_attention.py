"""Attention on the paged KV cache for CPUs: decode, prefill over cached pages, prefill over the chunk.

TVM's CPU kernels walk batch, heads, keys and the head dimension in nested scalar loops on one thread
(its paged prefill visits every row the cache could hold): decode cost 0.5 ms per layer at a 16-token
context plus 4.5 µs per cached token, and attention was 95 ms per layer of a 272-token prefill
(MobileLLaMA-1.4B shape) — more than the layer's matmuls. These kernels keep TVM's signatures and
semantics (online softmax in base 2, the log-sum-exp its merge step uses) and run (token, head) rows in
parallel, dot products and value updates in SIMD lanes. `replace_attention` swaps them into the module
the KV cache was exported into.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

# the global symbols the KV cache calls
DECODE_ATTENTION, PREFILL_ATTENTION, RAGGED_ATTENTION = "batch_decode_paged_kv_cpu", "batch_prefill_paged_kv_cpu", "batch_prefill_ragged_kv"


def _kernel_parts(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int):
    """The pieces every kernel here shares, as TVMScript macros: load a query row (pre-scaled for base-2
    exponentials), fold one key/value row into the online softmax, store the output row and its
    log-sum-exp. `state` holds the running max, the running sum, the score and the rescale."""
    D, group, chunks, log2e = head_dim, num_qo_heads // num_kv_heads, head_dim // lanes, math.log2(math.e)

    @T.macro
    def start(q, t, h, sm_scale, q_local, acc, state):
        for d in T.vectorized(D):
            q_local[d] = T.Cast("float32", q[t, h, d]) * (sm_scale * T.float32(log2e))
            acc[d] = T.float32(0)
        state[0] = T.float32(-5e4)
        state[1] = T.float32(1)

    @T.macro
    def attend(q_local, k_row, v_row, acc, part, state):
        for lane in T.vectorized(lanes):
            part[lane] = T.float32(0)
        for c in T.serial(chunks):
            for lane in T.vectorized(lanes):
                part[lane] = part[lane] + q_local[c * lanes + lane] * k_row[c * lanes + lane]
        state[2] = T.float32(0)
        for lane in T.serial(lanes):
            state[2] = state[2] + part[lane]
        state[3] = T.exp2(state[0] - T.max(state[0], state[2]))  # rescale of what is summed so far
        state[0] = T.max(state[0], state[2])
        state[2] = T.exp2(state[2] - state[0])  # this key's weight
        state[1] = state[1] * state[3] + state[2]
        for d in T.vectorized(D):
            acc[d] = acc[d] * state[3] + v_row[d] * state[2]

    @T.macro
    def finish(output, lse, t, h, acc, state):
        for d in T.vectorized(D):
            output[t, h, d] = T.Cast(dtype, acc[d] / state[1])
        lse[t, h] = state[0] + T.log2(state[1])

    return group, start, attend, finish


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int, page_size: int = 16) -> tirx.PrimFunc:
    """`batch_decode_paged_kv_cpu` without sliding window; rope must already be applied (the model
    uses `RopeMode.NORMAL`: q and k are rotated before the append, `rotary_mode` is 0)."""
    H_qo, D = num_qo_heads, head_dim
    group, start, attend, finish = _kernel_parts(num_kv_heads, num_qo_heads, head_dim, dtype, lanes)

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
                k_row = T.sblock_alloc_buffer((D,), "float32")
                v_row = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                b: T.let[T.int32] = bh // H_qo
                h: T.let[T.int32] = bh % H_qo
                begin: T.let[T.int32] = page_table_indptr[b]
                end: T.let[T.int32] = page_table_indptr[b + 1]
                kv_len: T.let[T.int32] = T.if_then_else(begin != end, (end - begin - 1) * page_size + length_info[b], 0)  # length_info[b]: tokens in the last page
                start(Q, b, h, sm_scale, q_local, acc, state)
                for j in T.serial(kv_len):
                    for d in T.vectorized(D):
                        k_row[d] = T.Cast("float32", pages[page_table_values[begin + j // page_size], 0, h // group, j % page_size, d])
                        v_row[d] = T.Cast("float32", pages[page_table_values[begin + j // page_size], 1, h // group, j % page_size, d])
                    attend(q_local, k_row, v_row, acc, part, state)
                finish(output, lse, b, h, acc, state)
    # fmt: on

    return batch_decode_paged_kv


def _prefill_rows(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int):
    """The body both prefill kernels share, as a macro: every (token, head) row in parallel, its
    sequence found from `q_indptr`, its visible keys (all, or causally up to its own position at the
    end), each key/value row fetched by the kernel's own `kv_length` / `load_kv` macros from its four
    source buffers."""
    H_qo, D = num_qo_heads, head_dim
    group, start, attend, finish = _kernel_parts(num_kv_heads, num_qo_heads, head_dim, dtype, lanes)

    @T.macro
    def rows(total_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, sources, kv_length, load_kv):
        for th in T.parallel(total_len * H_qo):
            with T.sblock("attn"):
                T.reads()  # regions depend on the page table / indptr: declared opaque
                T.writes()
                q_local = T.sblock_alloc_buffer((D,), "float32")
                k_row = T.sblock_alloc_buffer((D,), "float32")
                v_row = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                seq = T.sblock_alloc_buffer((2,), "int32")  # the row's sequence, its key count
                t: T.let[T.int32] = th // H_qo
                h: T.let[T.int32] = th % H_qo
                for bb in T.serial(batch_size):
                    if q_indptr[bb] <= t and t < q_indptr[bb + 1]:
                        seq[0] = bb
                kv_length(sources, seq)
                qo_len: T.let[T.int32] = q_indptr[seq[0] + 1] - q_indptr[seq[0]]
                visible: T.let[T.int32] = T.if_then_else(causal > 0, T.max(T.min(seq[1], seq[1] - qo_len + t - q_indptr[seq[0]] + 1), 0), seq[1])
                start(q, t, h, sm_scale, q_local, acc, state)
                for j in T.serial(visible):
                    load_kv(sources, seq, j, h // group, k_row, v_row)
                    attend(q_local, k_row, v_row, acc, part, state)
                finish(output, lse, t, h, acc, state)

    return rows


def prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int, page_size: int = 16) -> tirx.PrimFunc:
    """`batch_prefill_paged_kv_cpu` (no sliding window, keys already rotated) over the cached pages.
    TVM's visits `max_num_pages * page_size` rows per query, on one thread."""
    H_qo, D = num_qo_heads, head_dim
    rows = _prefill_rows(num_kv_heads, num_qo_heads, head_dim, dtype, lanes)

    @T.macro
    def kv_length(sources, seq):
        pages, page_values, page_indptr, length_info = sources
        begin: T.let[T.int32] = page_indptr[seq[0]]
        end: T.let[T.int32] = page_indptr[seq[0] + 1]
        seq[1] = T.if_then_else(begin != end, (end - begin - 1) * page_size + length_info[seq[0]], 0)

    @T.macro
    def load_kv(sources, seq, j, kv_head, k_row, v_row):
        pages, page_values, page_indptr, length_info = sources
        for d in T.vectorized(D):
            k_row[d] = T.Cast("float32", pages[page_values[page_indptr[seq[0]] + j // page_size], 0, kv_head, j % page_size, d])
            v_row[d] = T.Cast("float32", pages[page_values[page_indptr[seq[0]] + j // page_size], 1, kv_head, j % page_size, d])

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                               var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                               var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
                               rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": PREFILL_ATTENTION})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H_qo), "float32")
        assert rotary_mode == 0, "this prefill attention takes keys already rotated (RopeMode.NORMAL)"
        rows(total_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, (pages, page_values, page_indptr, length_info), kv_length, load_kv)
    # fmt: on

    return batch_prefill_paged_kv


def prefill_ragged_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, lanes: int) -> tirx.PrimFunc:
    """`batch_prefill_ragged_kv` (keys already rotated) over the chunk's own keys and values. TVM's
    runs the whole batch on one thread."""
    H_qo, D = num_qo_heads, head_dim
    rows = _prefill_rows(num_kv_heads, num_qo_heads, head_dim, dtype, lanes)

    @T.macro
    def kv_length(sources, seq):
        k, v, kv_indptr = sources
        seq[1] = kv_indptr[seq[0] + 1] - kv_indptr[seq[0]]

    @T.macro
    def load_kv(sources, seq, j, kv_head, k_row, v_row):
        k, v, kv_indptr = sources
        for d in T.vectorized(D):
            k_row[d] = T.Cast("float32", k[kv_indptr[seq[0]] + j, kv_head, d])
            v_row[d] = T.Cast("float32", v[kv_indptr[seq[0]] + j, kv_head, d])

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
                                var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                                rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": RAGGED_ATTENTION})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, num_kv_heads, D), dtype)
        v = T.match_buffer(var_v, (kv_len, num_kv_heads, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
        assert rotary_mode == 0, "this prefill attention takes keys already rotated (RopeMode.NORMAL)"
        rows(qo_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, (k, v, kv_indptr), kv_length, load_kv)
    # fmt: on

    return batch_prefill_ragged_kv


def replace_attention(lanes: int) -> tvm.transform.Pass:
    """Swap TVM's serial CPU attention kernels (decode, prefill over pages, prefill over the chunk)
    for the ones above, sized from the module's own."""

    @tvm.transform.module_pass(opt_level=0, name="ReplaceAttention")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            symbol = func.attrs.get("global_symbol")
            if symbol not in (DECODE_ATTENTION, PREFILL_ATTENTION, RAGGED_ATTENTION):
                continue
            q, source = func.params[0], func.params[2 if symbol != DECODE_ATTENTION else 1]
            heads, dim, dtype = int(q.shape[1]), int(q.shape[2]), q.dtype
            if symbol == DECODE_ATTENTION:
                mod[gv] = decode_attention(int(source.shape[2]), heads, dim, dtype, lanes, int(source.shape[3]))
            elif symbol == PREFILL_ATTENTION:
                mod[gv] = prefill_attention(int(source.shape[2]), heads, dim, dtype, lanes, int(source.shape[3]))
            elif symbol == RAGGED_ATTENTION:
                mod[gv] = prefill_ragged_attention(int(source.shape[1]), heads, dim, dtype, lanes)
        return mod

    return transform
