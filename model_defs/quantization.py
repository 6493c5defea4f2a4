"""MLC's 4-bit group quantization (q4f16_1, q4f32_1, q4f16_0) as Relax `nn` modules.

Symmetric int4, 8 values per uint32 (value i of a word at bits [4i, 4i+4)), groups of 32 along the
input (K) axis, one scale per group: w = (q - 7) * scale. An input size that is not a multiple of 32
gets a zero-padded last group (as MLC's); a linear whose shape NK64 cannot tile is stored NK. Layout `NK` stores `q_weight[out, in/8]`,
`q_scale[out, in/32]`; `KN` (the `_0` schemes, for Adreno/Metal GEMV) stores them transposed:
`q_weight[in/8, out]`, `q_scale[in/32, out]`; `NK64` (the `_3` schemes, for CPUs) interleaves 64
consecutive output rows word by word: `q_weight[out/64, in/8, 64]`, `q_scale[out/64, in/32, 64]`, so
one SIMD load brings the same word of 16 rows, every lane unpacks it with the same shift, and a
thread's 64 rows are one contiguous stream (16-row tiles, four streams per thread, decoded 25% slower). Each module
emits dequantize and matmul (or gather) as one `tensor_expr_op`, so the dequantize stage can be inlined
into the consumer by the target's schedule: full-precision weights are never materialized.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mobilevlm_mlc.errors import MobileVLMError

DEQUANTIZE_BLOCK = "dequantize"  # name of the TE stage that schedules inline
QUANTIZED_MATMUL = "quantized_matmul"  # op name: fused functions that contain one keep it in their name
ROW_TILE = 64  # rows interleaved by the NK64 layout: four 512-bit fp32 vectors, one decode task


class Layout(str, enum.Enum):
    """How a quantized weight W[n, k] is stored (the values are the names in build records and tests)."""

    NK = "NK"  # q_weight[n, k/8], q_scale[n, k/32]: MLC's `_1` schemes
    KN = "KN"  # transposed, q_weight[k/8, n]: the `_0` schemes, for Adreno / Metal GEMV
    NK64 = "NK64"  # 64 rows interleaved word by word, q_weight[n/64, k/8, 64]: the `_3` schemes, for CPUs

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class GroupQuantScheme:
    name: str
    model_dtype: str  # activations and scales
    layout: Layout = Layout.NK
    group_size: int = 32
    bits: int = 4

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1  # 7: q is stored as value + 7 in [0, 14]

    @property
    def dequantize_dtype(self) -> str:
        """dtype of the dequantized weight: the model dtype, except on CPUs (NK64), where fp16 arithmetic
        would round-trip through fp32 on every operation (x86 has none) and the product is fp32 anyway."""
        return "float32" if self.layout is Layout.NK64 else self.model_dtype

    def groups(self, k: int) -> int:
        """Groups along an input of size k: as MLC does, the last one is zero-padded when k is not a
        multiple of the group size (its scale comes from the real values; padded q's dequantize to 0)."""
        return -(-k // self.group_size)

    def for_shape(self, n: int, k: int) -> GroupQuantScheme:
        """The scheme a W[n, k] is stored with: NK64 needs whole 64-row tiles and whole groups (its CPU
        kernels step through both); any other shape falls back to NK, same numbers, another layout."""
        if self.layout is Layout.NK64 and (n % ROW_TILE or k % self.group_size):
            return dataclasses.replace(self, layout=Layout.NK)
        return self

    def fallback_reason(self, n: int, k: int) -> str:
        """Why `for_shape` falls back, in words (the build record's)."""
        if n % ROW_TILE:
            return f"{n} output rows are not a multiple of {ROW_TILE}"
        return f"{k} inputs are not a multiple of the group size {self.group_size}"

    def weight_shapes(self, n: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Stored shapes of (q_weight, q_scale) for a weight W[n, k] (k padded to whole groups)."""
        groups = self.groups(k)
        words = groups * self.group_size // self.per_word
        if self.layout is Layout.KN:
            return (words, n), (groups, n)
        if self.layout is Layout.NK64:
            return (n // ROW_TILE, words, ROW_TILE), (n // ROW_TILE, groups, ROW_TILE)
        return (n, words), (n, groups)


def _dequantize(scheme: GroupQuantScheme, q_weight: te.Tensor, q_scale: te.Tensor, row, col) -> tirx.PrimExpr:
    """Element (row=n, col=k) of the full-precision weight W[n, k] from the packed storage."""
    per_word, mask, dtype = scheme.per_word, tirx.const((1 << scheme.bits) - 1, "uint32"), scheme.dequantize_dtype
    if scheme.layout is Layout.NK:
        word, scale = q_weight[row, col // per_word], q_scale[row, col // scheme.group_size]
    elif scheme.layout is Layout.NK64:
        tile, lane = row // ROW_TILE, row % ROW_TILE
        word, scale = q_weight[tile, col // per_word, lane], q_scale[tile, col // scheme.group_size, lane]
    else:
        word, scale = q_weight[col // per_word, row], q_scale[col // scheme.group_size, row]
    shift = ((col % per_word) * scheme.bits).astype("uint32")
    if scheme.layout is Layout.NK64:
        return _dequantize_unshifted(word, shift, mask, scale.astype(dtype), scheme.max_int)
    value = ((word >> shift) & mask).astype(dtype) - tirx.const(scheme.max_int, dtype)
    return value * scale.astype(dtype)


def _dequantize_unshifted(
    word: tirx.PrimExpr, shift: tirx.PrimExpr, mask: tirx.PrimExpr, scale: tirx.PrimExpr, max_int: int
) -> tirx.PrimExpr:
    """(q - 7) * scale in float32 without shifting q down: the masked nibble converts to q * 2^shift
    exactly, and scale * 2^-shift (a power-of-two rescale, exact) undoes it. A CPU then spends per
    weight one AND, one convert and one FMA (q' * scale' - 7 * scale, the last shared by the word's
    8 values) instead of shift, AND, convert, subtract and multiply."""
    unscale = tirx.reinterpret("float32", (tirx.const(127, "uint32") - shift) << tirx.const(23, "uint32"))  # 2^-shift
    return (word & (mask << shift)).astype("float32") * (scale * unscale) - tirx.const(max_int, "float32") * scale


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale)^T, accumulated in float32, no bias."""

    def __init__(self, in_features: int, out_features: int, scheme: GroupQuantScheme):
        scheme = scheme.for_shape(out_features, in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        weight_shape, scale_shape = scheme.weight_shapes(out_features, in_features)
        self.q_weight = nn.Parameter(weight_shape, "uint32")
        self.q_scale = nn.Parameter(scale_shape, scheme.model_dtype)

    def to(self, dtype: str | None = None) -> None:  # storage dtypes are fixed by the scheme
        del dtype

    def forward(self, x: Tensor) -> Tensor:
        scheme, n_out, k_in = self.scheme, self.out_features, self.in_features

        def compute(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
            w = te.compute(
                (n_out, k_in), lambda n, k: _dequantize(scheme, q_weight, q_scale, n, k), name=DEQUANTIZE_BLOCK
            )
            k = te.reduce_axis((0, k_in), name="k")
            lead = list(x.shape[:-1])
            acc = te.compute(
                (*lead, n_out),
                lambda *i: te.sum(x[(*i[:-1], k)].astype("float32") * w[i[-1], k].astype("float32"), axis=k),
                name="matmul",
            )
            if scheme.model_dtype == "float32":
                return acc
            return te.compute(acc.shape, lambda *i: acc[i].astype(scheme.model_dtype), name="cast")

        return op.tensor_expr_op(compute, QUANTIZED_MATMUL, [x, self.q_weight, self.q_scale])


class QuantizedEmbedding(nn.Module):
    """Rows of a group-quantized table, dequantized inside the gather. Always NK (row-major per token)."""

    def __init__(self, num: int, dim: int, scheme: GroupQuantScheme):
        self.num, self.dim = num, dim
        self.scheme = dataclasses.replace(scheme, layout=Layout.NK)
        weight_shape, scale_shape = self.scheme.weight_shapes(num, dim)
        self.q_weight = nn.Parameter(weight_shape, "uint32")
        self.q_scale = nn.Parameter(scale_shape, scheme.model_dtype)

    def to(self, dtype: str | None = None) -> None:
        del dtype

    def forward(self, ids: Tensor) -> Tensor:
        scheme, dim = self.scheme, self.dim

        def compute(ids: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
            return te.compute(
                (*ids.shape, dim),
                lambda *i: _dequantize(scheme, q_weight, q_scale, ids[i[:-1]], i[-1]),
                name="quantized_take",
            )

        return op.tensor_expr_op(compute, "quantized_embedding", [ids, self.q_weight, self.q_scale])


def _children(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Every module below `module`, depth first: (dotted name, parent, attribute or index, child)."""
    for attr, child in list(vars(module).items()):
        name = f"{prefix}{attr}"
        if isinstance(child, nn.ModuleList):
            for i, item in enumerate(child):
                yield f"{name}.{i}", child, str(i), item
                yield from _children(item, f"{name}.{i}.")
        elif isinstance(child, nn.Module):
            yield name, module, attr, child
            yield from _children(child, f"{name}.")


def quantize_linears(module: nn.Module, scheme: GroupQuantScheme, prefix: str = "") -> None:
    """Replace every bias-free `nn.Linear` below `module` (in place) by a `QuantizedLinear`."""
    for name, parent, attr, child in list(_children(module, prefix)):
        if isinstance(child, nn.Linear):
            if child.bias is not None:
                raise ValueError(f"{name}: quantized linears have no bias")
            quantized = QuantizedLinear(int(child.in_features), int(child.out_features), scheme)
            if isinstance(parent, nn.ModuleList):
                parent.modules[int(attr)] = quantized
            else:
                setattr(parent, attr, quantized)


def quantized_modules(module: nn.Module, prefix: str = "") -> dict[str, GroupQuantScheme]:
    """Name prefix -> scheme of every quantized module below `module` (what convert must pack, and how)."""
    return {
        name: child.scheme
        for name, _, _, child in _children(module, prefix)
        if isinstance(child, (QuantizedLinear, QuantizedEmbedding))
    }


def layout_fallbacks(module: nn.Module, scheme: GroupQuantScheme) -> dict[str, str]:
    """Linears (layer numbers as '*') that could not take `scheme`'s layout: pattern -> layout and why."""
    found = {}
    for name, _, _, child in _children(module):
        if isinstance(child, QuantizedLinear) and child.scheme.layout != scheme.layout:
            pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
            found[pattern] = f"{child.scheme.layout}: {scheme.fallback_reason(child.out_features, child.in_features)}"
    return found


# ---- the registry: one entry per MLC quantization name ------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    name: str
    model_dtype: str  # activations, norms, the vision tower, and unquantized weights
    scheme: GroupQuantScheme | None = None


def _q4(name: str, layout: Layout) -> Quantization:
    """A 4-bit scheme; MLC's name says its dtype (`q4f16_*`: float16, `q4f32_*`: float32)."""
    dtype = {"q4f16": "float16", "q4f32": "float32"}[name[:5]]
    return Quantization(name, dtype, GroupQuantScheme(name, dtype, layout))


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("q0f32", "float32"),
        Quantization("q0f16", "float16"),
        _q4("q4f16_1", Layout.NK),
        _q4("q4f32_1", Layout.NK),
        _q4("q4f16_0", Layout.KN),
        _q4("q4f16_3", Layout.NK64),
        _q4("q4f32_3", Layout.NK64),
    )
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise MobileVLMError(f"unknown quantization '{name}' (expected one of {', '.join(QUANTIZATIONS)})")
    return QUANTIZATIONS[name]
