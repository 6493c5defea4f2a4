"""Prefill matmuls on AVX-512 VNNI: 4-bit weights times 8-bit activations, integer dot products.

A prefill matmul is compute-bound, and fp32 FMAs are its ceiling: 16 multiply-adds per instruction.
`vpdpbusd` does 64 (unsigned bytes times signed bytes, summed in fours into 32-bit lanes), so, as
llama.cpp does for Q4_0 x Q8_0, the activations are quantized per row and per group of 32 (the weight's
group) to int8, and each group's integer dot product is scaled back in fp32:

    y[m, n] = sum_g  s_w[n, g] * (s_x[m, g] * sum_j q_w * q_x  -  7 * s_x[m, g] * sum_j q_x)

(q_w in [0, 14] is the stored nibble, the weight being (q_w - 7) * s_w.) Decode keeps the fp32 GEMV:
it is bound by memory, not arithmetic, and keeps full-precision activations.

One kernel per (K, N): first every row of x is quantized (rows in parallel), then each task takes one
NK64 tile (64 output columns), unpacks its nibbles once into bytes laid out for `vpdpbusd` (16 columns
x 4 consecutive K per 512-bit vector), and for every block of `rows` rows accumulates
rows x column-vectors integer dot products per group in registers, folded into fp32 accumulators
after each group. `replace_prefill_matmuls` swaps it in for the quantized matmuls whose row count is
not 1.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from model_defs.quantization import QUANTIZED_MATMUL, ROW_TILE

LANES = 16  # 32-bit lanes of a 512-bit vector: 16 output columns, each 4 bytes of K
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def int8_quantized_matmul(k: int, n: int, dtype: str = "float32", rows: int = 6, column_vectors: int = 2) -> tirx.PrimFunc:
    """y[1, m, n] = x[1, m, k] @ W^T, W in the NK64 layout (q4f32_3, or q4f16_3 with `dtype` float16:
    activations and scales in that dtype, read into fp32), on int8 activations (module docstring)."""
    groups, quads, tiles, words = k // 32, k // 4, n // ROW_TILE, k // 8
    R, C, width = rows, column_vectors, column_vectors * LANES
    halves = ROW_TILE // width

    # fmt: off
    @T.prim_func(s_tir=True)
    def quantized_matmul_int8(var_x: T.handle, q_weight: T.Buffer((tiles, words, ROW_TILE), "uint32"),
                              q_scale: T.Buffer((tiles, groups, ROW_TILE), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (1, m, k), dtype)
        y = T.match_buffer(var_y, (1, m, n), dtype)
        padded: T.let[T.int64] = (m + R - 1) // R * R
        x_q = T.alloc_buffer((padded, quads), "int32")  # 4 int8 per word, K ascending from the low byte
        x_scale = T.alloc_buffer((padded, groups), "float32")
        x_offset = T.alloc_buffer((padded, groups), "float32")  # -7 * s_x * sum_j q_x
        for row in T.parallel(padded):
            with T.sblock("quantize"):
                T.reads()
                T.writes()
                amax = T.sblock_alloc_buffer((1,), "float32")
                total = T.sblock_alloc_buffer((1,), "int32")
                q = T.sblock_alloc_buffer((32,), "int32")
                for g in T.serial(groups):
                    amax[0] = T.float32(0)
                    for j in T.serial(32):
                        if row < m:
                            amax[0] = T.max(amax[0], T.fabs(T.Cast("float32", x[0, row, g * 32 + j])))
                    for j in T.serial(32):
                        q[j] = 0
                        if row < m and amax[0] > T.float32(0):
                            q[j] = T.Cast("int32", T.round(T.Cast("float32", x[0, row, g * 32 + j]) * (T.float32(127) / amax[0])))
                    total[0] = 0
                    for j in T.serial(32):
                        total[0] = total[0] + q[j]
                    for w in T.serial(8):
                        x_q[row, g * 8 + w] = (q[4 * w] & 255) | ((q[4 * w + 1] & 255) << 8) | ((q[4 * w + 2] & 255) << 16) | (q[4 * w + 3] << 24)
                    x_scale[row, g] = amax[0] / T.float32(127)
                    x_offset[row, g] = T.float32(-7) * x_scale[row, g] * T.Cast("float32", total[0])
        for tile in T.parallel(tiles):
            with T.sblock("gemm"):
                T.reads()
                T.writes()
                w_q = T.sblock_alloc_buffer((quads, ROW_TILE), "int32")  # bytes of 4 consecutive K per column
                acc = T.sblock_alloc_buffer((R, width), "int32", scope="local")
                out = T.sblock_alloc_buffer((R, width), "float32", scope="local")
                for kw in T.serial(words):
                    for col in T.vectorized(ROW_TILE):
                        w_q[2 * kw, col] = T.reinterpret("int32", (q_weight[tile, kw, col] & T.uint32(0xF))
                                                         | ((q_weight[tile, kw, col] & T.uint32(0xF0)) << T.uint32(4))
                                                         | ((q_weight[tile, kw, col] & T.uint32(0xF00)) << T.uint32(8))
                                                         | ((q_weight[tile, kw, col] & T.uint32(0xF000)) << T.uint32(12)))
                        w_q[2 * kw + 1, col] = T.reinterpret("int32", ((q_weight[tile, kw, col] >> T.uint32(16)) & T.uint32(0xF))
                                                             | ((q_weight[tile, kw, col] >> T.uint32(12)) & T.uint32(0xF00))
                                                             | ((q_weight[tile, kw, col] >> T.uint32(8)) & T.uint32(0xF0000))
                                                             | ((q_weight[tile, kw, col] >> T.uint32(4)) & T.uint32(0xF000000)))
                for block in T.serial(padded // R):
                    for half in T.serial(halves):
                        for r in T.unroll(R):
                            for lane in T.vectorized(width):
                                out[r, lane] = T.float32(0)
                        for g in T.serial(groups):
                            for r in T.unroll(R):
                                for lane in T.vectorized(width):
                                    acc[r, lane] = 0
                            for kq in T.unroll(8):
                                for c in T.unroll(C):
                                    for r in T.unroll(R):
                                        acc[r, T.ramp(c * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                            "int32x16", VPDPBUSD, acc[r, T.ramp(c * LANES, 1, LANES)],
                                            T.reinterpret("int8x64", w_q[g * 8 + kq, T.ramp(half * width + c * LANES, 1, LANES)]),
                                            T.reinterpret("int8x64", T.broadcast(x_q[block * R + r, g * 8 + kq], LANES)))
                            for c in T.unroll(C):
                                for r in T.unroll(R):
                                    out[r, T.ramp(c * LANES, 1, LANES)] = out[r, T.ramp(c * LANES, 1, LANES)] + T.Cast("float32x16", q_scale[tile, g, T.ramp(half * width + c * LANES, 1, LANES)]) * (
                                        T.Cast("float32x16", acc[r, T.ramp(c * LANES, 1, LANES)]) * T.broadcast(x_scale[block * R + r, g], LANES)
                                        + T.broadcast(x_offset[block * R + r, g], LANES))
                        for r in T.unroll(R):
                            if block * R + r < m:
                                for lane in T.vectorized(width):
                                    y[0, block * R + r, tile * ROW_TILE + half * width + lane] = T.Cast(dtype, out[r, lane])
    # fmt: on

    return quantized_matmul_int8


def _prefill_matmul_shape(func: tirx.PrimFunc) -> tuple[int, int, str] | None:
    """(K, N, dtype) of an NK64 quantized matmul over a symbolic number of rows, x[1, m, K] -> y[1, m, N]; else None."""
    if len(func.params) != 4:
        return None
    x, weight, scale, y = func.params
    if len(x.shape) != 3 or len(weight.shape) != 3 or len(y.shape) != 3 or isinstance(x.shape[1], tirx.IntImm):
        return None
    if x.dtype not in ("float32", "float16") or (weight.dtype, scale.dtype, y.dtype) != ("uint32", x.dtype, x.dtype) or int(weight.shape[2]) != ROW_TILE:
        return None
    k, n = int(x.shape[2]), int(y.shape[2])
    if int(weight.shape[1]) * 8 != k or int(scale.shape[1]) * 32 != k or int(weight.shape[0]) * ROW_TILE != n:
        return None
    return k, n, x.dtype


@tvm.transform.module_pass(opt_level=0, name="ReplacePrefillMatmuls")
def replace_prefill_matmuls(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Every NK64 quantized matmul over a symbolic row count (prefill) becomes the int8 kernel above,
    same parameters; decode's one-row GEMVs keep fp32 activations. The kernel is opaque to fusion, so
    an elementwise tail (residual add) runs as a kernel of its own."""
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or not gv.name_hint.startswith(QUANTIZED_MATMUL):
            continue
        shape = _prefill_matmul_shape(func)
        if shape is not None:
            mod[gv] = int8_quantized_matmul(*shape).with_attr("global_symbol", gv.name_hint)
    return mod
