"""An 8-bit KV cache inside TVM's fp16 pages: the kernels that write, copy and read its pages.

A batch-8 decode step reads the whole KV cache once per layer: at 163 tokens per sequence that is 513 MB
of fp16 (MobileLLaMA-1.4B shape), against 0.8 GB of 4-bit weights. Stored in 8 bits with a scale per
token and head (symmetric, `max|x| / 127`), the reads halve. TVM 0.27's runtime allocates the pages, and
its q/k/v work buffers, in the cache's one dtype, and calls only the library's kernels on the pages; so
the pages stay fp16 to the runtime, and each (page, K or V, head) block of `KEYS x head_dim` fp16
elements holds, at its start, `KEYS x head_dim` int8 values (token-major) then `KEYS` float32 scales.
Capacity is unchanged (half of each block is unused); bytes read per step halve.

Every kernel that touches pages is swapped: append (quantizes), single-page copy (forks), compaction,
the debug read (dequantizes), and the attention kernels (`attention.py`, `int8_kv=True`). Tree attention
over pages (speculative decoding) is not implemented for it and fails with a message when called.

The views are buffers declared over the pages' data (`T.decl_buffer(..., data=pages.data)`); TVM 0.27's
AttachGlobalSymbol fails on a function declaring one when it adds a system-library prefix ("Cannot
treat type ir.Call as type ir.Expr"), so the Android `.tar` (a system library) has no 8-bit cache.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE

LANES = 16
# the page kernels the KV cache's creation takes, as the exported module names them (their TIR names in
# TVM's `_page_kernels.py`)
APPEND, COPY_PAGE, COMPACT, DEBUG_GET = (
    "tir_kv_cache_transpose_append",
    "copy_single_page_cpu",
    "compact_kv_copy_cpu",
    "tir_kv_cache_debug_get_kv",
)
PAGED_TREE_ATTENTION = "tree_attn_paged_kv_cpu"  # global symbol


def block_bytes(head_dim: int, dtype: str) -> int:
    """Bytes of one (page, K or V, head) block of the cache: KV_PAGE_SIZE rows of `head_dim` `dtype`."""
    return KV_PAGE_SIZE * head_dim * (tvm.DataType(dtype).bits // 8)


def scale_index(head_dim: int) -> int:
    """Index, in a block's float32 view, of its first token's scale: after KV_PAGE_SIZE x head_dim int8."""
    return KV_PAGE_SIZE * head_dim // 4


def _sizes(num_kv_heads: int, head_dim: int, dtype: str) -> tuple[int, int, int, int, int]:
    """What the kernels below close over: heads, head dim, page size, block bytes, first scale's index."""
    return num_kv_heads, head_dim, KV_PAGE_SIZE, block_bytes(head_dim, dtype), scale_index(head_dim)


def check_fits(head_dim: int, dtype: str) -> None:
    if KV_PAGE_SIZE * (head_dim + 4) > block_bytes(head_dim, dtype) or head_dim % LANES:
        raise ValueError(
            f"an 8-bit KV cache needs pages of at least 16-bit elements and a head dim of 16k (got {dtype}, {head_dim})"
        )


def transpose_append(num_kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """`kv_cache_transpose_append` quantizing: each token's head row of K and of V to int8 with its own
    scale (max |x| / 127, round to nearest even); a row of zeros gets scale 0. A task per (token, head)."""
    check_fits(head_dim, dtype)
    H, D, page_size, block, at = _sizes(num_kv_heads, head_dim, dtype)

    @T.macro
    def quantize_row(src, values, scales, lane_max, stat, kind, t, h, page, slot):
        for i in T.vectorized(LANES):
            lane_max[i] = T.float32(0)
        for c in T.serial(D // LANES):
            for i in T.vectorized(LANES):
                lane_max[i] = T.max(lane_max[i], T.fabs(T.Cast("float32", src[t, h, c * LANES + i])))
        stat[0] = T.float32(0)
        for i in T.serial(LANES):
            stat[0] = T.max(stat[0], lane_max[i])
        scales[page, kind, h, at + slot] = stat[0] / T.float32(127)
        stat[1] = T.if_then_else(stat[0] > T.float32(0), T.float32(127) / stat[0], T.float32(0))
        for d in T.vectorized(D):
            values[page, kind, h, slot * D + d] = T.Cast(
                "int8",
                T.min(T.max(T.nearbyint(T.Cast("float32", src[t, h, d]) * stat[1]), T.float32(-127)), T.float32(127)),
            )

    # fmt: off
    @T.prim_func(s_tir=True)
    def tir_kv_cache_transpose_append(var_pages: T.handle, var_k_data: T.handle, var_v_data: T.handle,
                                      var_position_map: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntoken = T.int64()
        num_pages = T.int64()
        position_map_elem_offset = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, H, page_size, D), dtype)
        k_data = T.match_buffer(var_k_data, (ntoken, H, D), dtype)
        v_data = T.match_buffer(var_v_data, (ntoken, H, D), dtype)
        position_map = T.match_buffer(var_position_map, (ntoken,), "int32", elem_offset=position_map_elem_offset)
        values = T.decl_buffer((num_pages, 2, H, block), "int8", data=pages.data)
        scales = T.decl_buffer((num_pages, 2, H, block // 4), "float32", data=pages.data)
        for th in T.parallel(ntoken * H):
            with T.sblock("append"):
                T.reads()  # positions come from the map: declared opaque
                T.writes()
                lane_max = T.sblock_alloc_buffer((LANES,), "float32")
                stat = T.sblock_alloc_buffer((2,), "float32")  # max |x|, 127 / max |x|
                t: T.let[T.int64] = th // H
                h: T.let[T.int64] = th % H
                position: T.let[T.int32] = position_map[t]
                if position != -1:
                    quantize_row(k_data, values, scales, lane_max, stat, 0, t, h, position // page_size, position % page_size)
                    quantize_row(v_data, values, scales, lane_max, stat, 1, t, h, position // page_size, position % page_size)
    # fmt: on

    return tir_kv_cache_transpose_append


def copy_single_page(num_kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """`kv_cache_copy_single_page_cpu` (a fork inside a page): copies the whole page, values and scales;
    rows past `copy_length` are stale in the copy and masked by its length, as TVM's leaves them."""
    H, D, page_size = num_kv_heads, head_dim, KV_PAGE_SIZE

    # fmt: off
    @T.prim_func(s_tir=True)
    def copy_single_page_cpu(var_pages: T.handle, src_page_id: T.int64, tgt_page_id: T.int64, copy_length: T.int64):
        T.func_attr({"tirx.is_scheduled": True})
        num_pages = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, H, page_size, D), dtype)
        for kind, h, r in T.grid(2, H, page_size):
            for d in T.vectorized(D):
                with T.sblock("copy"):
                    pages[tgt_page_id, kind, h, r, d] = pages[src_page_id, kind, h, r, d]
    # fmt: on

    return copy_single_page_cpu


def compact_copy(num_kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """`kv_cache_compact_kv_copy_cpu`: moves tokens' rows (values and scale) from src to dst positions."""
    H, D, page_size, block, at = _sizes(num_kv_heads, head_dim, dtype)

    # fmt: off
    @T.prim_func(s_tir=True)
    def compact_kv_copy_cpu(var_pages: T.handle, var_copy_length_indptr: T.handle, var_copy_src_dst_pos: T.handle,
                            batch_size: T.int32):
        T.func_attr({"tirx.is_scheduled": True})
        num_pages = T.int32()
        total_copy_length = T.int32()
        copy_length_indptr_elem_offset = T.int32()
        copy_src_dst_pos_elem_offset = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, H, page_size, D), dtype)
        copy_length_indptr = T.match_buffer(var_copy_length_indptr, (batch_size + 1,), "int32", elem_offset=copy_length_indptr_elem_offset)
        copy_src_dst_pos = T.match_buffer(var_copy_src_dst_pos, (2, total_copy_length), "int32", elem_offset=copy_src_dst_pos_elem_offset)
        values = T.decl_buffer((num_pages, 2, H, block), "int8", data=pages.data)
        scales = T.decl_buffer((num_pages, 2, H, block // 4), "float32", data=pages.data)
        for b, kind, h in T.grid(batch_size, 2, H):
            for i in T.serial(copy_length_indptr[b + 1] - copy_length_indptr[b]):
                with T.sblock("copy"):
                    src: T.let[T.int32] = copy_src_dst_pos[0, copy_length_indptr[b] + i]
                    dst: T.let[T.int32] = copy_src_dst_pos[1, copy_length_indptr[b] + i]
                    for d in T.vectorized(D):
                        values[dst // page_size, kind, h, dst % page_size * D + d] = values[src // page_size, kind, h, src % page_size * D + d]
                    scales[dst // page_size, kind, h, at + dst % page_size] = scales[src // page_size, kind, h, at + src % page_size]
    # fmt: on

    return compact_kv_copy_cpu


def debug_get_kv(num_hidden_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """`kv_cache_debug_get_kv`: the cached K and V at the given positions, dequantized to `dtype`."""
    H, D, page_size, block, at = _sizes(num_kv_heads, head_dim, dtype)

    # fmt: off
    @T.prim_func(s_tir=True)
    def tir_kv_cache_debug_get_kv(var_pages: T.handle, var_position_map: T.handle, var_k_data: T.handle,
                                  var_v_data: T.handle, layer_id: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seqlen = T.int64()
        num_pages = T.int64()
        position_map_elem_offset = T.int64()
        pages = T.match_buffer(var_pages, (num_pages, 2, H, page_size, D), dtype)
        position_map = T.match_buffer(var_position_map, (seqlen,), "int32", elem_offset=position_map_elem_offset)
        k_data = T.match_buffer(var_k_data, (num_hidden_layers, seqlen, H, D), dtype)
        v_data = T.match_buffer(var_v_data, (num_hidden_layers, seqlen, H, D), dtype)
        values = T.decl_buffer((num_pages, 2, H, block), "int8", data=pages.data)
        scales = T.decl_buffer((num_pages, 2, H, block // 4), "float32", data=pages.data)
        for p, h, d in T.grid(seqlen, H, D):
            with T.sblock("dequantize"):
                position: T.let[T.int32] = position_map[p]
                k_data[layer_id, p, h, d] = T.Cast(dtype, T.Cast("float32", values[position // page_size, 0, h, position % page_size * D + d]) * scales[position // page_size, 0, h, at + position % page_size])
                v_data[layer_id, p, h, d] = T.Cast(dtype, T.Cast("float32", values[position // page_size, 1, h, position % page_size * D + d]) * scales[position // page_size, 1, h, at + position % page_size])
    # fmt: on

    return tir_kv_cache_debug_get_kv


def unsupported(func: tirx.PrimFunc, what: str) -> tirx.PrimFunc:
    """`func`'s signature with a body that fails, naming `what` (a kernel with no 8-bit version)."""
    message = f"{what} is not supported by a library built with an 8-bit KV cache (--kv-cache int8)"
    # (condition, kind, message parts): the FFI's order; TVM 0.27's Python signature lists kind first
    failure = tirx.AssertStmt(tirx.const(False, "bool"), tvm.ir.StringImm("RuntimeError"), [tvm.ir.StringImm(message)])
    return func.with_body(failure)


def replace_page_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Swap the KV cache's page kernels for the 8-bit ones, sized from TVM's; tree attention over pages
    fails with a message. A module without all four is refused: a page kernel left in fp16 would write
    or read a layout the attention kernels do not."""
    found = set()
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        if name in (APPEND, COPY_PAGE, COMPACT, DEBUG_GET):
            found.add(name)
            pages = func.params[0]
            heads, dim, dtype = int(pages.shape[2]), int(pages.shape[4]), str(pages.dtype)
            if name == APPEND:
                mod[gv] = transpose_append(heads, dim, dtype)
            elif name == COPY_PAGE:
                mod[gv] = copy_single_page(heads, dim, dtype)
            elif name == COMPACT:
                mod[gv] = compact_copy(heads, dim, dtype)
            else:
                layers = int(func.params[2].shape[0])
                mod[gv] = debug_get_kv(layers, heads, dim, dtype)
        elif func.attrs.get("global_symbol") == PAGED_TREE_ATTENTION:
            mod[gv] = unsupported(func, "tree attention over the KV cache's pages (speculative decoding)")
    missing = {APPEND, COPY_PAGE, COMPACT, DEBUG_GET} - found
    if missing:
        raise ValueError(
            f"an 8-bit KV cache: this TVM's KV cache has no page kernel named {', '.join(sorted(missing))}"
        )
    return mod
