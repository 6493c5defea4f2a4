"""Attention on the paged KV cache for CPUs: decode, prefill over cached pages, prefill over the chunk.

TVM's CPU kernels walk batch, heads, keys and the head dimension in nested scalar loops on one thread
(its paged prefill visits every row the cache could hold): decode cost 0.5 ms per layer at a 16-token
context plus 4.5 µs per cached token, and attention was 95 ms per layer of a 272-token prefill
(MobileLLaMA-1.4B shape) — more than the layer's matmuls. These kernels keep TVM's signatures and
semantics (online softmax in base 2, the log-sum-exp its merge step uses) and keep the online softmax
in SIMD vectors: decode transposes 16 keys' dot products into one vector of scores, prefill holds 16
query rows in the lanes; exponentials are a polynomial (libm's `exp2f` does not vectorize).
`replace_attention` swaps them into the module the KV cache was exported into.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE

from .int8_kv import block_bytes, replace_page_kernels, scale_index
from .prefetch import CACHE_LINE, prefetch_line

# the global symbols the KV cache calls
DECODE_ATTENTION, PREFILL_ATTENTION, RAGGED_ATTENTION = (
    "batch_decode_paged_kv_cpu",
    "batch_prefill_paged_kv_cpu",
    "batch_prefill_ragged_kv",
)

ROWS = 16  # a prefill task's query rows: one per fp32 lane of AVX-512
KEYS = KV_PAGE_SIZE  # keys per decode step: one page of the cache

# 2^f on [0, 1): degree-5 fit of the relative error, 1 at 0 exactly (an unchanged max rescales by exactly 1)
_EXP2_FRACTION = (
    1.0,
    0.6931513547897339,
    0.2401641607284546,
    0.05580044537782669,
    0.009016687981784344,
    0.0018671829020604491,
)


def _exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^x for x <= 0 in arithmetic that vectorizes (libm's `exp2f` does not): 2^floor(x) built in the
    exponent bits times a polynomial of the fraction; relative error 1.6e-7, exactly 0 below 2^-127."""
    x = tirx.max(x, tirx.const(-127.0, "float32"))
    whole = tirx.floor(x)
    fraction = x - whole
    poly = tirx.const(_EXP2_FRACTION[-1], "float32")
    for c in reversed(_EXP2_FRACTION[:-1]):
        poly = poly * fraction + tirx.const(c, "float32")
    return poly * tirx.reinterpret("float32", (whole.astype("int32") + 127) << 23)


# transposing sums: 16 vectors of 16 partial sums -> one vector of 16 totals, in 4 levels of pairwise
# shuffles (concatenated pair, lanes 0-31) and adds; level i halves the partials each key keeps
_TREE = (
    (list(range(0, 8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))),
    ([i + o for o in (0, 8, 16, 24) for i in range(4)], [i + o for o in (4, 12, 20, 28) for i in range(4)]),
    ([i + o for o in range(0, 32, 4) for i in range(2)], [i + o for o in range(2, 32, 4) for i in range(2)]),
    (list(range(0, 32, 2)), list(range(1, 32, 2))),
)


def _prefetcher(nbytes: int, parts: int):
    """A macro prefetching part `part` of `parts` of one head's keys (kind 0) or values (kind 1) of a
    page: the first `nbytes` of its block, through the block's int8 view. Pages sit a whole page of every
    head apart, so no hardware prefetcher follows a task from one page to the next; the decode kernel asks
    for the next page while it computes one, a part at a time between its steps: asked all at once (128
    lines), the requests filled the core's miss buffers and it waited for them, so memory and arithmetic
    did not overlap (8.5 ms for 8 sequences of 150 tokens, 27 GB/s, against 38 GB/s for the same reads
    alone). On a task's last page it asks for the next task's first (8 sequences, 24 layers, alternated in
    one process: -19% at 16 tokens, -7% at 64, -3% at 180)."""
    lines = -(-nbytes // CACHE_LINE // parts)

    @T.macro
    def prefetch(pages_i8, page, kind, kv_head, part):
        for i in T.unroll(lines):  # the line's index inline: a name assigned here would be a heap buffer
            if part * lines + i < nbytes // CACHE_LINE:
                T.evaluate(prefetch_line(T.address_of(pages_i8[page, kind, kv_head, (part * lines + i) * CACHE_LINE])))

    return prefetch


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def decode_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, prefetch: bool = True, int8_kv: bool = False
) -> tirx.PrimFunc:
    """`batch_decode_paged_kv_cpu` without sliding window; rope must already be applied (the model
    uses `RopeMode.NORMAL`: q and k are rotated before the append, `rotary_mode` is 0). A task is one
    (sequence, head); a step is one page of `KEYS` keys (the cache's page size): each key's dot product
    accumulates in a vector of partial sums (head dimension in lanes), the 16 vectors are transposed and
    summed in 4 levels of shuffles into one vector of 16 scores, and the online softmax runs on that
    vector (polynomial exp2), so no key costs a horizontal sum or a libm call. The last page's stale
    rows are scored (lanes never mix) and masked; only valid rows' values are read."""
    H_qo, D, group, log2e, page_size = num_qo_heads, head_dim, num_qo_heads // num_kv_heads, math.log2(math.e), KEYS
    chunks = D // KEYS
    block, scale_at = block_bytes(D, dtype), scale_index(D)  # an 8-bit cache's block layout (`int8_kv`)
    prefetch_part = _prefetcher(KEYS * D + KEYS * 4 if int8_kv else block, chunks)

    def key_vector(pages, pages_i8, page, kv_head, j, c):
        if int8_kv:
            return T.Cast(f"float32x{KEYS}", pages_i8[page, 0, kv_head, T.ramp(j * D + c * KEYS, 1, KEYS)])
        return T.Cast(f"float32x{KEYS}", pages[page, 0, kv_head, j, T.ramp(c * KEYS, 1, KEYS)])

    def value(pages, pages_i8, page, kv_head, j, d):
        if int8_kv:
            return T.Cast("float32", pages_i8[page, 1, kv_head, j * D + d])
        return T.Cast("float32", pages[page, 1, kv_head, j, d])

    def tree(level: int, vectors, pair: int):
        lo, hi = _TREE[level]
        a, b = vectors[2 * pair, T.ramp(0, 1, KEYS)], vectors[2 * pair + 1, T.ramp(0, 1, KEYS)]
        return T.Shuffle([a, b], lo) + T.Shuffle([a, b], hi)

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
        if int8_kv or prefetch:  # the blocks' byte and float32 views (`int8_kv.py`: not in a system library)
            pages_i8 = T.decl_buffer((max_num_pages, 2, num_kv_heads, block), "int8", data=pages.data)
            scales = T.decl_buffer((max_num_pages, 2, num_kv_heads, block // 4), "float32", data=pages.data)
        else:  # unused names: `meta_var` binds them without renaming `pages` (a plain assignment would)
            pages_i8 = T.meta_var(pages)
            scales = T.meta_var(pages)

        for bh in T.parallel(B * H_qo):
            with T.sblock("attn"):
                T.reads()  # regions depend on the page table: declared opaque
                T.writes()
                q_local = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                # the keys' partial sums: two stack arrays of 8 vectors (one of 16 would be 1 KiB: heap)
                partial_lo = T.sblock_alloc_buffer((KEYS // 2, KEYS), "float32")
                partial_hi = T.sblock_alloc_buffer((KEYS // 2, KEYS), "float32")
                half = T.sblock_alloc_buffer((KEYS // 2, KEYS), "float32")
                quarter = T.sblock_alloc_buffer((KEYS // 4, KEYS), "float32")
                eighth = T.sblock_alloc_buffer((KEYS // 8, KEYS), "float32")
                score = T.sblock_alloc_buffer((KEYS,), "float32")
                row_sum = T.sblock_alloc_buffer((KEYS,), "float32")  # per lane; summed at the end
                state = T.sblock_alloc_buffer((3,), "float32")  # running max, new max, rescale
                b: T.let[T.int32] = bh // H_qo
                h: T.let[T.int32] = bh % H_qo
                begin: T.let[T.int32] = page_table_indptr[b]
                end: T.let[T.int32] = page_table_indptr[b + 1]
                kv_len: T.let[T.int32] = T.if_then_else(begin != end, (end - begin - 1) * page_size + length_info[b], 0)  # length_info[b]: tokens in the last page
                for d in T.vectorized(D):
                    q_local[d] = T.Cast("float32", Q[b, h, d]) * (sm_scale * T.float32(log2e))
                    acc[d] = T.float32(0)
                for j in T.vectorized(KEYS):
                    row_sum[j] = T.if_then_else(j == 0, T.float32(1), T.float32(0))
                state[0] = T.float32(-5e4)
                for kb in T.serial(T.ceildiv(kv_len, KEYS)):
                    page: T.let[T.int32] = page_table_values[begin + kb]
                    for j in T.unroll(KEYS // 2):
                        partial_lo[j, T.ramp(0, 1, KEYS)] = T.broadcast(T.float32(0), KEYS)
                        partial_hi[j, T.ramp(0, 1, KEYS)] = T.broadcast(T.float32(0), KEYS)
                    for c in T.serial(chunks):
                        if prefetch and kb + 1 < T.ceildiv(kv_len, KEYS):
                            prefetch_part(pages_i8, page_table_values[begin + kb + 1], 0, h // group, c)
                            prefetch_part(pages_i8, page_table_values[begin + kb + 1], 1, h // group, c)
                        elif prefetch and bh + 1 < B * H_qo and page_table_indptr[(bh + 1) // H_qo] < page_table_indptr[(bh + 1) // H_qo + 1]:
                            # the last page: the next task's first, else every task began with a miss
                            next_page: T.let[T.int32] = page_table_values[page_table_indptr[(bh + 1) // H_qo]]
                            prefetch_part(pages_i8, next_page, 0, (bh + 1) % H_qo // group, c)
                            prefetch_part(pages_i8, next_page, 1, (bh + 1) % H_qo // group, c)
                        for j in T.unroll(KEYS // 2):
                            partial_lo[j, T.ramp(0, 1, KEYS)] = partial_lo[j, T.ramp(0, 1, KEYS)] + q_local[T.ramp(c * KEYS, 1, KEYS)] * key_vector(pages, pages_i8, page, h // group, j, c)
                            partial_hi[j, T.ramp(0, 1, KEYS)] = partial_hi[j, T.ramp(0, 1, KEYS)] + q_local[T.ramp(c * KEYS, 1, KEYS)] * key_vector(pages, pages_i8, page, h // group, j + KEYS // 2, c)
                    for i in T.unroll(KEYS // 4):
                        half[i, T.ramp(0, 1, KEYS)] = tree(0, partial_lo, i)
                        half[i + KEYS // 4, T.ramp(0, 1, KEYS)] = tree(0, partial_hi, i)
                    for i in T.unroll(KEYS // 4):
                        quarter[i, T.ramp(0, 1, KEYS)] = tree(1, half, i)
                    for i in T.unroll(KEYS // 8):
                        eighth[i, T.ramp(0, 1, KEYS)] = tree(2, quarter, i)
                    score[T.ramp(0, 1, KEYS)] = tree(3, eighth, 0)
                    if int8_kv:
                        score[T.ramp(0, 1, KEYS)] = score[T.ramp(0, 1, KEYS)] * scales[page, 0, h // group, T.ramp(scale_at, 1, KEYS)]
                    for j in T.vectorized(KEYS):
                        score[j] = T.if_then_else(kb * KEYS + j < kv_len, score[j], T.float32(-1e30))
                    state[1] = state[0]
                    for j in T.serial(KEYS):
                        state[1] = T.max(state[1], score[j])
                    state[2] = _exp2(state[0] - state[1])
                    state[0] = state[1]
                    for j in T.vectorized(KEYS):
                        score[j] = _exp2(score[j] - state[1])
                        row_sum[j] = row_sum[j] * state[2] + score[j]
                    if int8_kv:  # the values' scales folded into their weights
                        score[T.ramp(0, 1, KEYS)] = score[T.ramp(0, 1, KEYS)] * scales[page, 1, h // group, T.ramp(scale_at, 1, KEYS)]
                    for d in T.vectorized(D):
                        acc[d] = acc[d] * state[2]
                    for j in T.serial(T.min(KEYS, kv_len - kb * KEYS)):  # valid keys only: a page's tail is stale
                        for d in T.vectorized(D):
                            acc[d] = acc[d] + score[j] * value(pages, pages_i8, page, h // group, j, d)
                state[1] = T.float32(0)
                for j in T.serial(KEYS):
                    state[1] = state[1] + row_sum[j]
                for d in T.vectorized(D):
                    output[b, h, d] = T.Cast(dtype, acc[d] / state[1])
                lse[b, h] = state[0] + T.log2(state[1])
    # fmt: on

    return batch_decode_paged_kv


def _prefill_blocks(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str):
    """The body both prefill kernels share, as a macro. A task is one head and `ROWS` consecutive query
    rows, held one row per SIMD lane (queries transposed), so the online softmax runs on vectors with no
    horizontal reductions: per step of `KEYS` keys, scores[key, rows] accumulate over the head dimension
    (a key's element broadcast times a vector of the rows' query elements), the max, rescale and
    exponentials are lane-wise, and each row's output (head dimension in lanes) takes the step's 16
    weighted value rows. A step's keys and values are copied to tiles by the kernel's `load_block` macro
    (rows past the sequence clamped to its last; they are masked). Tasks are head-major, so a thread's
    run of tasks reads one head's keys (in its L2) over and over."""
    H_qo, D, group, log2e = num_qo_heads, head_dim, num_qo_heads // num_kv_heads, math.log2(math.e)

    @T.macro
    def blocks(total_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, sources, kv_length, load_block):
        for task in T.parallel(H_qo * T.ceildiv(total_len, ROWS)):
            with T.sblock("attn"):
                T.reads()  # regions depend on the page table / indptr: declared opaque
                T.writes()
                q_t = T.sblock_alloc_buffer((D, ROWS), "float32")
                k_tile = T.sblock_alloc_buffer((KEYS, D), "float32")
                v_tile = T.sblock_alloc_buffer((KEYS, D), "float32")
                acc = T.sblock_alloc_buffer((ROWS, D), "float32")
                score = T.sblock_alloc_buffer((KEYS, ROWS), "float32", scope="local")
                out_row = T.sblock_alloc_buffer((D,), "float32", scope="local")
                row_max = T.sblock_alloc_buffer((ROWS,), "float32")
                row_sum = T.sblock_alloc_buffer((ROWS,), "float32")
                new_max = T.sblock_alloc_buffer((ROWS,), "float32")
                rescale = T.sblock_alloc_buffer((ROWS,), "float32")
                visible = T.sblock_alloc_buffer((ROWS,), "int32")
                seq = T.sblock_alloc_buffer((3,), "int32")  # the sequence, its key count, keys the task's rows see
                h: T.let[T.int32] = task // T.ceildiv(total_len, ROWS)
                t0: T.let[T.int32] = task % T.ceildiv(total_len, ROWS) * ROWS
                for bb in T.serial(batch_size):
                    if q_indptr[bb] < t0 + ROWS and t0 < q_indptr[bb + 1]:
                        seq[0] = bb
                        kv_length(sources, seq)
                        lo: T.let[T.int32] = T.max(t0, q_indptr[bb])
                        rows: T.let[T.int32] = T.min(t0 + ROWS, q_indptr[bb + 1]) - lo
                        first: T.let[T.int32] = (
                            seq[1] - (q_indptr[bb + 1] - q_indptr[bb]) + (lo - q_indptr[bb]) + 1
                        )  # keys row 0 sees if causal
                        seq[2] = 0
                        for r in T.serial(ROWS):
                            visible[r] = T.if_then_else(
                                r < rows, T.if_then_else(causal > 0, T.max(T.min(first + r, seq[1]), 0), seq[1]), 0
                            )
                            seq[2] = T.max(seq[2], visible[r])
                            row_max[r] = T.float32(-5e4)
                            row_sum[r] = T.float32(1)
                            for d in T.serial(D):
                                q_t[d, r] = T.if_then_else(
                                    r < rows,
                                    T.Cast("float32", q[lo + T.min(r, rows - 1), h, d]) * (sm_scale * T.float32(log2e)),
                                    T.float32(0),
                                )
                            for d in T.vectorized(D):
                                acc[r, d] = T.float32(0)
                        for kb in T.serial(T.ceildiv(seq[2], KEYS)):
                            load_block(sources, seq, kb, h // group, k_tile, v_tile)
                            for j in T.unroll(KEYS):
                                for r in T.vectorized(ROWS):
                                    score[j, r] = T.float32(0)
                            for d in T.serial(D):
                                for j in T.unroll(KEYS):
                                    for r in T.vectorized(ROWS):
                                        score[j, r] = score[j, r] + k_tile[j, d] * q_t[d, r]
                            for r in T.vectorized(ROWS):
                                new_max[r] = row_max[r]
                            for j in T.unroll(KEYS):
                                for r in T.vectorized(ROWS):
                                    score[j, r] = T.if_then_else(
                                        kb * KEYS + j < visible[r], score[j, r], T.float32(-1e30)
                                    )
                                    new_max[r] = T.max(new_max[r], score[j, r])
                            for r in T.vectorized(ROWS):
                                rescale[r] = _exp2(row_max[r] - new_max[r])
                                row_sum[r] = row_sum[r] * rescale[r]
                                row_max[r] = new_max[r]
                            for j in T.unroll(KEYS):
                                for r in T.vectorized(ROWS):
                                    score[j, r] = _exp2(score[j, r] - new_max[r])
                                    row_sum[r] = row_sum[r] + score[j, r]
                            for r in T.serial(ROWS):
                                for d in T.vectorized(D):
                                    out_row[d] = acc[r, d] * rescale[r]
                                for j in T.unroll(KEYS):
                                    for d in T.vectorized(D):
                                        out_row[d] = out_row[d] + score[j, r] * v_tile[j, d]
                                for d in T.vectorized(D):
                                    acc[r, d] = out_row[d]
                        for r in T.serial(rows):
                            for d in T.vectorized(D):
                                output[lo + r, h, d] = T.Cast(dtype, acc[r, d] / row_sum[r])
                            lse[lo + r, h] = row_max[r] + T.log2(row_sum[r])

    return blocks


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def prefill_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16, int8_kv: bool = False
) -> tirx.PrimFunc:
    """`batch_prefill_paged_kv_cpu` (no sliding window, keys already rotated) over the cached pages.
    TVM's visits `max_num_pages * page_size` rows per query, on one thread. `int8_kv`: pages hold the
    8-bit layout of `int8_kv.py` (then `page_size` must be its KV_PAGE_SIZE)."""
    H_qo, D = num_qo_heads, head_dim
    block, scale_at = block_bytes(D, dtype), scale_index(D)
    blocks = _prefill_blocks(num_kv_heads, num_qo_heads, head_dim, dtype)

    @T.macro
    def kv_length(sources, seq):
        pages, page_values, page_indptr, length_info = sources
        begin: T.let[T.int32] = page_indptr[seq[0]]
        end: T.let[T.int32] = page_indptr[seq[0] + 1]
        seq[1] = T.if_then_else(begin != end, (end - begin - 1) * page_size + length_info[seq[0]], 0)

    def cached(pages, kind, page, kv_head, row, d):
        """Element d of a cached row, in float32."""
        if int8_kv:
            values, scales = pages
            return (
                T.Cast("float32", values[page, kind, kv_head, row * D + d])
                * scales[page, kind, kv_head, scale_at + row]
            )
        return T.Cast("float32", pages[page, kind, kv_head, row, d])

    @T.macro
    def load_block(sources, seq, kb, kv_head, k_tile, v_tile):
        pages, page_values, page_indptr, length_info = sources
        for j in T.serial(KEYS):
            key: T.let[T.int32] = T.min(kb * KEYS + j, seq[1] - 1)
            for d in T.vectorized(D):
                k_tile[j, d] = cached(
                    pages, 0, page_values[page_indptr[seq[0]] + key // page_size], kv_head, key % page_size, d
                )
                v_tile[j, d] = cached(
                    pages, 1, page_values[page_indptr[seq[0]] + key // page_size], kv_head, key % page_size, d
                )

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
        if int8_kv:
            values = T.decl_buffer((max_num_pages, 2, num_kv_heads, block), "int8", data=pages.data)
            scales = T.decl_buffer((max_num_pages, 2, num_kv_heads, block // 4), "float32", data=pages.data)
        blocks(total_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, ((values, scales) if int8_kv else pages, page_values, page_indptr, length_info), kv_length, load_block)
    # fmt: on

    return batch_prefill_paged_kv


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def prefill_ragged_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """`batch_prefill_ragged_kv` (keys already rotated) over the chunk's own keys and values. TVM's
    runs the whole batch on one thread."""
    H_qo, D = num_qo_heads, head_dim
    blocks = _prefill_blocks(num_kv_heads, num_qo_heads, head_dim, dtype)

    @T.macro
    def kv_length(sources, seq):
        k, v, kv_indptr = sources
        seq[1] = kv_indptr[seq[0] + 1] - kv_indptr[seq[0]]

    @T.macro
    def load_block(sources, seq, kb, kv_head, k_tile, v_tile):
        k, v, kv_indptr = sources
        for j in T.serial(KEYS):
            key: T.let[T.int32] = kv_indptr[seq[0]] + T.min(kb * KEYS + j, seq[1] - 1)
            for d in T.vectorized(D):
                k_tile[j, d] = T.Cast("float32", k[key, kv_head, d])
                v_tile[j, d] = T.Cast("float32", v[key, kv_head, d])

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
        blocks(qo_len, batch_size, q, q_indptr, output, lse, causal, sm_scale, (k, v, kv_indptr), kv_length, load_block)
    # fmt: on

    return batch_prefill_ragged_kv


def replace_attention(prefetch: bool, int8_kv: bool = False) -> tvm.transform.Pass:
    """Swap TVM's serial CPU attention kernels (decode, prefill over pages, prefill over the chunk) for
    the ones above, sized from the module's own; `prefetch`: decode asks for each head's next page;
    `int8_kv`: the cache's pages hold 8-bit K and V (`int8_kv.py`), and every kernel on them is swapped."""

    @tvm.transform.module_pass(opt_level=0, name="ReplaceAttention")
    def replace(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = _replace_attention(mod, prefetch, int8_kv)
        return replace_page_kernels(mod) if int8_kv else mod

    return replace


def _replace_attention(mod: tvm.IRModule, prefetch: bool, int8_kv: bool) -> tvm.IRModule:
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        symbol = func.attrs.get("global_symbol")
        if symbol not in (DECODE_ATTENTION, PREFILL_ATTENTION, RAGGED_ATTENTION):
            continue
        q, source = func.params[0], func.params[2 if symbol != DECODE_ATTENTION else 1]
        heads, dim, dtype = int(q.shape[1]), int(q.shape[2]), str(q.dtype)
        if symbol == DECODE_ATTENTION:
            if (
                int(source.shape[3]) == KEYS and dim % KEYS == 0
            ):  # a page per step (the engine's page size); else TVM's stays
                mod[gv] = decode_attention(int(source.shape[2]), heads, dim, dtype, prefetch, int8_kv)
            elif int8_kv:
                raise ValueError(
                    f"an 8-bit KV cache needs pages of {KEYS} tokens and a head dim of 16k (got {int(source.shape[3])}, {dim})"
                )
        elif symbol == PREFILL_ATTENTION:
            mod[gv] = prefill_attention(int(source.shape[2]), heads, dim, dtype, int(source.shape[3]), int8_kv)
        elif symbol == RAGGED_ATTENTION:
            mod[gv] = prefill_ragged_attention(int(source.shape[1]), heads, dim, dtype)
    return mod
