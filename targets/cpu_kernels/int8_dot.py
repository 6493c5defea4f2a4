"""The one step of the int8 quantized matmuls that differs between instruction sets: weight bytes
(nibbles 0..15) times signed activation bytes, summed in fours into each 32-bit output lane.

A kernel accumulates one quantization group (32 inputs: 8 steps of 4 bytes per lane) with
`accumulate`, then `finish` turns the accumulator into int32 lanes for the group's fp32 rescale:

- AVX-512 VNNI: `vpdpbusd` on 512-bit vectors (16 lanes), the accumulator is the int32 result.
- AVX-VNNI (Intel Alder Lake and later, AMD Zen 5 client): the same `vpdpbusd` on 256-bit vectors.
- AVX2: `vpmaddubsw` multiplies the bytes and adds pairs into int16 lanes; the group's 8 steps add up
  in int16 (a pair is at most 2 x 15 x 127 = 3810, 8 of them 30480 < 2^15: no overflow) and one
  `vpmaddwd` by 1 per group sums the int16 pairs into int32. 2 + 1/8 instructions per step where VNNI
  takes 1, as llama.cpp's AVX2 Q4_0 x Q8_0 does.
- Arm dotprod (Armv8.2-A; Cortex-A76/A78, Neoverse N1, Snapdragon 888's cores): `sdot` on 128-bit
  vectors (4 lanes), signed by signed bytes; the nibbles 0..15 are the same bytes read as signed. i8mm's
  `usdot` would compute the same sums, so the kernels take `sdot` on every dotprod CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features


@dataclass(frozen=True)
class Int8Dot:
    name: str  # what the build record says
    feature: str  # the LLVM target feature it needs
    cpu_flag: str  # the same, as Linux's /proc/cpuinfo names it
    lanes: int  # 32-bit output lanes per vector
    registers: int  # vector registers the kernels' register blocks are sized for
    intrinsic: str  # the LLVM intrinsic of its step
    instruction: str  # the instruction its code must contain (tests read the disassembly)
    int16_pairs: bool = False  # no byte dot product: multiply into int16 pairs, widen once per group

    @property
    def acc_dtype(self) -> str:
        return "int16" if self.int16_pairs else "int32"

    @property
    def acc_lanes(self) -> int:
        """Accumulator lanes per vector of outputs."""
        return self.lanes * 2 if self.int16_pairs else self.lanes

    def accumulate(self, acc: tirx.PrimExpr, weight_bytes: tirx.PrimExpr, activations: tirx.PrimExpr) -> tirx.PrimExpr:
        """acc + the products of `weight_bytes` (one vector of packed unsigned bytes) with the 4 signed
        bytes `activations` (one int32) repeated across the vector."""
        lanes = self.lanes
        weights = T.reinterpret(f"int8x{4 * lanes}", weight_bytes)  # unsigned for x86, 0..15 either way
        x = T.reinterpret(f"int8x{4 * lanes}", T.broadcast(activations, lanes))
        if self.int16_pairs:
            return acc + T.call_llvm_pure_intrin(f"int16x{2 * lanes}", self.intrinsic, weights, x)
        return T.call_llvm_pure_intrin(f"int32x{lanes}", self.intrinsic, acc, weights, x)

    def finish(self, acc: tirx.PrimExpr) -> tirx.PrimExpr:
        """The group's accumulator as int32 lanes."""
        if not self.int16_pairs:
            return acc
        ones = T.broadcast(T.int16(1), 2 * self.lanes)
        return T.call_llvm_pure_intrin(f"int32x{self.lanes}", "llvm.x86.avx2.pmadd.wd", acc, ones)


AVX512_VNNI = Int8Dot("avx512-vnni", "avx512vnni", "avx512_vnni", 16, 32, "llvm.x86.avx512.vpdpbusd.512", "vpdpbusd")
AVX_VNNI = Int8Dot("avx-vnni", "avxvnni", "avx_vnni", 8, 16, "llvm.x86.avx512.vpdpbusd.256", "vpdpbusd")  # VEX
AVX2 = Int8Dot("avx2", "avx2", "avx2", 8, 16, "llvm.x86.avx2.pmadd.ub.sw", "vpmaddubsw", int16_pairs=True)
NEON_DOTPROD = Int8Dot("neon-dotprod", "dotprod", "asimddp", 4, 32, "llvm.aarch64.neon.sdot", "sdot")
INT8_DOTS = (AVX512_VNNI, AVX_VNNI, AVX2, NEON_DOTPROD)  # best first (a CPU has x86's or Arm's)


def int8_dot(target: tvm.target.Target) -> Int8Dot | None:
    """The best int8 dot product `target`'s CPU has, or None (the matmuls then keep the model's dtype)."""
    if target.kind.name != "llvm":
        return None
    return next((d for d in INT8_DOTS if target_has_features(d.feature, target)), None)
