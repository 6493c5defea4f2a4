"""Quantized matmuls on int8 dot products: 4-bit weights times 8-bit activations, integer arithmetic.

A prefill matmul is compute-bound, and fp32 FMAs are its ceiling: 16 multiply-adds per 512-bit
instruction. A byte dot product (`vpdpbusd`) does 64, so, as llama.cpp does for Q4_0 x Q8_0, the
activations are quantized per row and per group of 32 (the weight's group) to int8, and each group's
integer dot product is scaled back in fp32:

    y[m, n] = sum_g  s_w[n, g] * (s_x[m, g] * sum_j q_w * q_x  -  7 * s_x[m, g] * sum_j q_x)

(q_w in [0, 14] is the stored nibble, the weight being (q_w - 7) * s_w.) Decode uses them too: its
GEMV is bound by memory, but two cores unpacking to fp32 (AND, convert, two FMAs per 16 weights) are
barely faster than the memory, while a word's even and odd nibbles go straight into two dot products.

The kernels are one design for every x86 level; the dot-product step (`int8_dot.Int8Dot`: AVX-512
VNNI, AVX-VNNI, AVX2) and the register blocks sized for its vector width are what differ.

Activations are packed in the weights' nibble order (per word of 8 K values: the even K's 4 bytes, then
the odd K's), so a word needs AND, shift, AND and no shuffles. The GEMM (prefill: any number of rows)
first quantizes every row (in parallel), then each task takes one NK64 tile (64 output columns), unpacks
its nibbles once into bytes, and for every block of `rows` rows accumulates rows x column-vectors
integer dot products per group in registers, folded into fp32 accumulators after each group. The GEMV
(decode, logits: one row) streams each 64-row tile once. `replace_quantized_matmuls` swaps them in.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mobilevlm_mlc.model_defs.quantization import QUANTIZED_MATMUL, ROW_TILE

from .int8_dot import Int8Dot
from .prefetch import CACHE_LINE, prefetch_line

NIBBLES = 0x0F0F0F0F  # a packed word's even nibbles (K = 0, 2, 4, 6 of its 8) as 4 bytes; >> 4 gives the odd


def _nibbles(word: tirx.PrimExpr, odd: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """A vector of packed words' even (`odd` 0) or odd (1) nibbles as bytes; `odd` is an unrolled loop
    variable, so the shift is a constant."""
    shift = T.broadcast(T.Cast("uint32", odd * 4), lanes)
    return (word >> shift) & T.broadcast(T.uint32(NIBBLES), lanes)


def _rescale(
    total: tirx.PrimExpr, weight_scale: tirx.PrimExpr, x_scale: tirx.PrimExpr, x_offset: tirx.PrimExpr, lanes: int
) -> tirx.PrimExpr:
    """One group's integer dot products in fp32: s_w * (s_x * total - 7 * s_x * sum q_x)."""
    return T.Cast(f"float32x{lanes}", weight_scale) * (
        T.Cast(f"float32x{lanes}", total) * T.broadcast(x_scale, lanes) + T.broadcast(x_offset, lanes)
    )


# x_q's byte order: byte j of a group's packed bytes is the group's value PACKED_ORDER[j] (per word of 8
# K values, the even K's 4 bytes, then the odd K's: the weights' nibble order)
PACKED_ORDER = tuple(word // 2 * 8 + word % 2 + 2 * byte for word in range(8) for byte in range(4))


def _quantize_rows(k: int, dtype: str):
    """The macro both kernels start with: row `row` of x rounded to int8 per group of 32, packed in the
    weights' nibble order, with each group's scale and -7 * scale * sum of its values. A group is one
    32-lane vector from load to store — a shuffle into the packed order, the |max| and the sum as LLVM
    vector reductions — because as scalar loops (a branch per element for the max, the bytes packed
    through the stack) quantizing 8 rows took 12% of a batch-8 step's matmuls."""
    groups = k // 32

    @T.macro
    def quantize(x, row, x_q, x_scale, x_offset):
        for g in T.serial(groups):
            values = T.Shuffle([T.Cast("float32x32", x[0, row, T.ramp(g * 32, 1, 32)])], list(PACKED_ORDER))
            amax = T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax", T.fabs(values))
            inverse = T.Select(amax > T.float32(0), T.float32(127) / amax, T.float32(0))
            q = T.Cast("int32x32", T.round(values * T.broadcast(inverse, 32)))
            x_q[row, T.ramp(g * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int8x32", q))
            x_scale[row, g] = amax / T.float32(127)
            x_offset[row, g] = (
                T.float32(-7)
                * x_scale[row, g]
                * T.Cast("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", q))
            )

    return quantize


PREFETCH_GROUPS = 4  # how far ahead the skinny path asks for weights: measured best of 2, 3, 4, 6, 8


def _group_prefetcher(dtype: str):
    """A macro asking for group `g` of a tile: its 4 packed words of 64 columns (16 cache lines) and
    its 64 scales."""
    scale_lines = ROW_TILE * (tvm.DataType(dtype).bits // 8) // CACHE_LINE
    words_per_line = CACHE_LINE // 4

    @T.macro
    def prefetch_group(q_weight, q_scale, tile, g):
        for line in T.unroll(4 * ROW_TILE // words_per_line):
            T.evaluate(prefetch_line(T.address_of(q_weight[tile, g * 4 + line // 4, line % 4 * words_per_line])))
        for line in T.unroll(scale_lines):
            T.evaluate(prefetch_line(T.address_of(q_scale[tile, g, line * (ROW_TILE // scale_lines)])))

    return prefetch_group


SKINNY_ROWS = 8  # up to this many rows (a batch_decode step of up to 8 sequences), the skinny path
# register blocks by the size of the vector register file, measured fastest streaming from DRAM:
# skinny (rows, column vectors per pass, rows accumulated at once) for 2, 4 and 8 rows; GEMM (rows,
# column vectors)
SKINNY_BLOCKS = {32: ((2, 4, 2), (4, 4, 4), (8, 4, 4)), 16: ((2, 4, 2), (4, 2, 4), (8, 2, 4))}
GEMM_BLOCKS = {32: (6, 2), 16: (3, 2)}
GEMV_VECTORS = 4  # column vectors per GEMV pass: even and odd accumulators for each


def _skinny_rows(k: int, n: int, dtype: str, dot: Int8Dot, block: int, vectors: int, row_block: int, prefetch: bool):
    """The macro of the skinny path for up to `block` rows. A task is one 64-column tile, read once as
    one stream whatever the rows: for each group it takes the group's 4 packed words (1 KiB, contiguous)
    in passes of `vectors` column vectors, `row_block` rows at a time, so the integer accumulators of
    one pass fit the vector registers; each word goes straight into `2 * row_block` dot products per
    vector (even and odd nibbles for each row), and each row's broadcast activation feeds all `vectors`
    of them. (Tasks of a column slice each read every fourth cache line of a tile: the hardware
    prefetchers do not follow that, and 8 rows streamed at 6.6 GB/s instead of 16.)

    Two things keep it near the memory's speed with 8 rows. The accumulators live in registers only if
    LLVM sees a stack array: TVM 0.27 lowers a CPU `local` buffer to a heap workspace, and a `global`
    one to the stack only under 1 KiB, so a pass's accumulators are two stack buffers of half the rows
    (one 16 x 16-lane int32 buffer is exactly 1 KiB; on the heap every dot product went through a store
    and a load: 8 rows 0.45 ms, now 0.31, for a 2048 x 11264 matmul in cache). And with `prefetch`, a
    task asks for the weights `PREFETCH_GROUPS` groups ahead: at 8 rows the arithmetic spaces the loads
    out so far that the hardware prefetchers fall behind (from DRAM: 1.04 ms, with it 0.43-0.52; the
    1-row GEMV streams fastest without); in a tile's last groups it asks for the next tile's first ones,
    the thread's next task (TVM gives each thread a contiguous run of tiles): each tile's first groups
    had waited for memory (8 rows of a layer's four matmuls from DRAM, alternated: -7%)."""
    groups, tiles = k // 32, n // ROW_TILE
    L, A, C = dot.lanes, dot.acc_lanes, vectors
    width = C * L
    passes, B, RB = ROW_TILE // width, block, row_block
    AHEAD = PREFETCH_GROUPS
    prefetch_group = _group_prefetcher(dtype)
    half = RB // 2  # the accumulators of a pass: two stack buffers of `half` rows each

    # fmt: off
    @T.macro
    def accumulate(acc, first, x_q, q_weight, tile, g, p, w):
        for r in T.unroll(half):
            for c in T.unroll(C):
                for odd in T.unroll(2):
                    acc[r, T.ramp(c * A, 1, A)] = dot.accumulate(
                        acc[r, T.ramp(c * A, 1, A)],
                        _nibbles(q_weight[tile, g * 4 + w, T.ramp(p * width + c * L, 1, L)], odd, L),
                        x_q[first + r, g * 8 + 2 * w + odd])

    @T.macro
    def rescale(acc, first, x_scale, x_offset, q_scale, out, tile, g, p):
        for r in T.unroll(half):
            for c in T.unroll(C):
                out[first + r, T.ramp(p * width + c * L, 1, L)] = out[first + r, T.ramp(p * width + c * L, 1, L)] + _rescale(
                    dot.finish(acc[r, T.ramp(c * A, 1, A)]), q_scale[tile, g, T.ramp(p * width + c * L, 1, L)],
                    x_scale[first + r, g], x_offset[first + r, g], L)

    @T.macro
    def skinny(x_q, x_scale, x_offset, q_weight, q_scale, y, m):
        for tile in T.parallel(tiles):
            with T.sblock("skinny"):
                T.reads()
                T.writes()
                acc_a = T.sblock_alloc_buffer((half, C * A), dot.acc_dtype)
                acc_b = T.sblock_alloc_buffer((half, C * A), dot.acc_dtype)
                out = T.sblock_alloc_buffer((B, ROW_TILE), "float32", scope="local")
                for r in T.unroll(B):
                    for lane in T.vectorized(ROW_TILE):
                        out[r, lane] = T.float32(0)
                for g in T.serial(groups):
                    if prefetch and g + AHEAD < groups:
                        prefetch_group(q_weight, q_scale, tile, g + AHEAD)
                    elif prefetch and tile + 1 < tiles and g + AHEAD - groups < groups:  # the next tile's start
                        prefetch_group(q_weight, q_scale, tile + 1, g + AHEAD - groups)
                    for p in T.unroll(passes):
                        for h in T.unroll(B // RB):
                            for r in T.unroll(half):
                                for c in T.unroll(C):
                                    acc_a[r, T.ramp(c * A, 1, A)] = T.broadcast(T.Cast(dot.acc_dtype, 0), A)
                                    acc_b[r, T.ramp(c * A, 1, A)] = T.broadcast(T.Cast(dot.acc_dtype, 0), A)
                            for w in T.unroll(4):
                                accumulate(acc_a, h * RB, x_q, q_weight, tile, g, p, w)
                                accumulate(acc_b, h * RB + half, x_q, q_weight, tile, g, p, w)
                            rescale(acc_a, h * RB, x_scale, x_offset, q_scale, out, tile, g, p)
                            rescale(acc_b, h * RB + half, x_scale, x_offset, q_scale, out, tile, g, p)
                for r in T.unroll(B):
                    if T.Cast("int64", r) < m:
                        for lane in T.vectorized(ROW_TILE):
                            y[0, r, tile * ROW_TILE + lane] = T.Cast(dtype, out[r, lane])
    # fmt: on

    return skinny


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def int8_quantized_matmul(k: int, n: int, dtype: str, dot: Int8Dot, prefetch: bool = True) -> tirx.PrimFunc:
    """y[1, m, n] = x[1, m, k] @ W^T for any m (prefill, batch decode), W in the NK64 layout (q4f32_3, or
    q4f16_3 with `dtype` float16: activations and scales in that dtype, read into fp32), on int8
    activations. Up to `SKINNY_ROWS` rows (a batch of decode tokens) the skinny path streams the packed
    words once for all rows (`_skinny_rows`) instead of unpacking each tile and padding the rows to the
    GEMM's blocks."""
    groups, quads, tiles, words = k // 32, k // 4, n // ROW_TILE, k // 8
    L, A = dot.lanes, dot.acc_lanes
    R, C = GEMM_BLOCKS[dot.registers]
    width = C * L
    halves = ROW_TILE // width
    pad = math.lcm(R, SKINNY_ROWS)  # rows are quantized in multiples of both paths' blocks
    quantize = _quantize_rows(k, dtype)
    skinny2, skinny4, skinny8 = (
        _skinny_rows(k, n, dtype, dot, *block, prefetch) for block in SKINNY_BLOCKS[dot.registers]
    )

    # fmt: off
    @T.macro
    def gemm(x_q, x_scale, x_offset, q_weight, q_scale, y, m, padded):
        for tile in T.parallel(tiles):
            with T.sblock("gemm"):
                T.reads()
                T.writes()
                w_q = T.sblock_alloc_buffer((quads, ROW_TILE), "int32")  # the tile's nibbles as bytes, x_q's order
                acc = T.sblock_alloc_buffer((R, C * A), dot.acc_dtype)  # stack: registers (see `_skinny_rows`)
                out = T.sblock_alloc_buffer((R, width), "float32", scope="local")
                for kw in T.serial(words):
                    for col in T.vectorized(ROW_TILE):
                        w_q[2 * kw, col] = T.reinterpret("int32", q_weight[tile, kw, col] & T.uint32(NIBBLES))
                        w_q[2 * kw + 1, col] = T.reinterpret("int32", (q_weight[tile, kw, col] >> T.uint32(4)) & T.uint32(NIBBLES))
                for block in T.serial(padded // R):
                    for half in T.serial(halves):
                        for r in T.unroll(R):
                            for lane in T.vectorized(width):
                                out[r, lane] = T.float32(0)
                        for g in T.serial(groups):
                            for r in T.unroll(R):
                                for lane in T.vectorized(C * A):
                                    acc[r, lane] = T.Cast(dot.acc_dtype, 0)
                            for kq in T.unroll(8):
                                for c in T.unroll(C):
                                    for r in T.unroll(R):
                                        acc[r, T.ramp(c * A, 1, A)] = dot.accumulate(
                                            acc[r, T.ramp(c * A, 1, A)],
                                            w_q[g * 8 + kq, T.ramp(half * width + c * L, 1, L)],
                                            x_q[block * R + r, g * 8 + kq])
                            for c in T.unroll(C):
                                for r in T.unroll(R):
                                    out[r, T.ramp(c * L, 1, L)] = out[r, T.ramp(c * L, 1, L)] + _rescale(
                                        dot.finish(acc[r, T.ramp(c * A, 1, A)]), q_scale[tile, g, T.ramp(half * width + c * L, 1, L)],
                                        x_scale[block * R + r, g], x_offset[block * R + r, g], L)
                        for r in T.unroll(R):
                            if block * R + r < m:
                                for lane in T.vectorized(width):
                                    y[0, block * R + r, tile * ROW_TILE + half * width + lane] = T.Cast(dtype, out[r, lane])

    @T.prim_func(s_tir=True)
    def quantized_matmul_int8(
        var_x: T.handle,
        q_weight: T.Buffer((tiles, words, ROW_TILE), "uint32"),
        q_scale: T.Buffer((tiles, groups, ROW_TILE), dtype),
        var_y: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (1, m, k), dtype)
        y = T.match_buffer(var_y, (1, m, n), dtype)
        padded: T.let[T.int64] = (m + pad - 1) // pad * pad
        x_q = T.alloc_buffer((padded, quads), "int32")
        x_scale = T.alloc_buffer((padded, groups), "float32")
        x_offset = T.alloc_buffer((padded, groups), "float32")
        for row in T.parallel(m):  # the padding rows' products are computed but never stored
            quantize(x, row, x_q, x_scale, x_offset)
        if m <= 2:
            skinny2(x_q, x_scale, x_offset, q_weight, q_scale, y, m)
        elif m <= 4:
            skinny4(x_q, x_scale, x_offset, q_weight, q_scale, y, m)
        elif m <= SKINNY_ROWS:
            skinny8(x_q, x_scale, x_offset, q_weight, q_scale, y, m)
        else:
            gemm(x_q, x_scale, x_offset, q_weight, q_scale, y, m, padded)
    # fmt: on

    return quantized_matmul_int8


@functools.cache  # built once per process: TVMScript parsing costs seconds per kernel
def int8_quantized_gemv(k: int, n: int, dtype: str, dot: Int8Dot) -> tirx.PrimFunc:
    """y[1, 1, n] = x[1, 1, k] @ W^T (decode, the last token's logits), W in the NK64 layout, on int8
    activations. Decode is memory-bound, but at 30-40 GB/s two cores of fp32 unpacking (AND, convert,
    two FMAs per 16 weights) are not much faster than the memory: here a loaded word costs AND, shift,
    AND and two dot products (its even and odd nibbles), and a group's 4 words one rescale per vector.
    A task is one 64-row tile, read once as one stream (in passes of `GEMV_VECTORS` vectors where the
    vectors are narrow); even and odd nibbles accumulate apart (two dependency chains per vector)."""
    groups, quads, tiles, words = k // 32, k // 4, n // ROW_TILE, k // 8
    L, A = dot.lanes, dot.acc_lanes
    V = min(GEMV_VECTORS, ROW_TILE // L)
    passes = ROW_TILE // (V * L)
    quantize = _quantize_rows(k, dtype)

    # fmt: off
    @T.prim_func(s_tir=True)
    def quantized_gemv_int8(x: T.Buffer((1, 1, k), dtype), q_weight: T.Buffer((tiles, words, ROW_TILE), "uint32"),
                            q_scale: T.Buffer((tiles, groups, ROW_TILE), dtype), y: T.Buffer((1, 1, n), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        x_q = T.alloc_buffer((1, quads), "int32")
        x_scale = T.alloc_buffer((1, groups), "float32")
        x_offset = T.alloc_buffer((1, groups), "float32")
        for row in T.serial(1):
            quantize(x, row, x_q, x_scale, x_offset)
        for tile in T.parallel(tiles):
            with T.sblock("gemv"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((2, V * A), dot.acc_dtype)  # even, odd; stack: registers (`_skinny_rows`)
                out = T.sblock_alloc_buffer((ROW_TILE,), "float32", scope="local")
                for lane in T.vectorized(ROW_TILE):
                    out[lane] = T.float32(0)
                for g in T.serial(groups):
                    for p in T.unroll(passes):
                        for odd in T.unroll(2):
                            for lane in T.vectorized(V * A):
                                acc[odd, lane] = T.Cast(dot.acc_dtype, 0)
                        for w in T.unroll(4):
                            for c in T.unroll(V):
                                for odd in T.unroll(2):
                                    acc[odd, T.ramp(c * A, 1, A)] = dot.accumulate(
                                        acc[odd, T.ramp(c * A, 1, A)],
                                        _nibbles(q_weight[tile, g * 4 + w, T.ramp((p * V + c) * L, 1, L)], odd, L),
                                        x_q[0, g * 8 + 2 * w + odd])
                        for c in T.unroll(V):
                            out[T.ramp((p * V + c) * L, 1, L)] = out[T.ramp((p * V + c) * L, 1, L)] + _rescale(
                                dot.finish(acc[0, T.ramp(c * A, 1, A)] + acc[1, T.ramp(c * A, 1, A)]),
                                q_scale[tile, g, T.ramp((p * V + c) * L, 1, L)], x_scale[0, g], x_offset[0, g], L)
                for lane in T.vectorized(ROW_TILE):
                    y[0, 0, tile * ROW_TILE + lane] = T.Cast(dtype, out[lane])
    # fmt: on

    return quantized_gemv_int8


def _nk64_matmul(func: tirx.PrimFunc) -> tuple[int, int, str, bool] | None:
    """(K, N, dtype, one row) of an NK64 quantized matmul x[1, m, K] -> y[1, m, N] whose row count is
    symbolic (prefill) or 1 (decode, logits); else None."""
    if len(func.params) != 4:
        return None
    x, weight, scale, y = func.params
    if len(x.shape) != 3 or len(weight.shape) != 3 or len(y.shape) != 3:
        return None
    rows = x.shape[1]
    if isinstance(rows, tirx.IntImm) and int(rows) != 1:
        return None
    if (
        x.dtype not in ("float32", "float16")
        or (weight.dtype, scale.dtype, y.dtype) != ("uint32", x.dtype, x.dtype)
        or int(weight.shape[2]) != ROW_TILE
    ):
        return None
    k, n = int(x.shape[2]), int(y.shape[2])
    if int(weight.shape[1]) * 8 != k or int(scale.shape[1]) * 32 != k or int(weight.shape[0]) * ROW_TILE != n:
        return None
    return k, n, str(x.dtype), isinstance(rows, tirx.IntImm)


def replace_quantized_matmuls(dot: Int8Dot, prefetch: bool = True) -> tvm.transform.Pass:
    """Every NK64 quantized matmul becomes one of the int8 kernels above on `dot`, same parameters: over
    a symbolic row count (prefill) the GEMM, over one row (decode, logits) the GEMV. They are opaque to
    fusion, so an elementwise tail (residual add) runs as a kernel of its own."""

    @tvm.transform.module_pass(opt_level=0, name="ReplaceQuantizedMatmuls")
    def replace(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or not gv.name_hint.startswith(QUANTIZED_MATMUL):
                continue
            shape = _nk64_matmul(func)
            if shape is not None:
                k, n, dtype, one_row = shape
                kernel = (
                    int8_quantized_gemv(k, n, dtype, dot)
                    if one_row
                    else int8_quantized_matmul(k, n, dtype, dot, prefetch)
                )
                mod[gv] = kernel.with_attr("global_symbol", gv.name_hint)
        return mod

    return replace
