"""The CPU kernels of `targets/`: our decode attention against numpy and against TVM's own CPU kernel
on the same paged KV cache layout, our RoPE against TVM's; the int8 matmuls against the reference's
emulation of them."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from mobilevlm_mlc.bench.benchmark import cpu_features
from mobilevlm_mlc.check.reference import int8_activations
from mobilevlm_mlc.convert.packing import dequantize_weight, quantize_weight
from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE
from mobilevlm_mlc.model_defs.quantization import QUANTIZATIONS
from mobilevlm_mlc.targets.cpu import x86_kernels
from mobilevlm_mlc.targets.cpu_kernels import int8_kv
from mobilevlm_mlc.targets.cpu_kernels.attention import decode_attention, prefill_attention, prefill_ragged_attention
from mobilevlm_mlc.targets.cpu_kernels.int8_dot import INT8_DOTS, Int8Dot, int8_dot
from mobilevlm_mlc.targets.cpu_kernels.int8_matmul import int8_quantized_gemv, int8_quantized_matmul
from mobilevlm_mlc.targets.cpu_kernels.rope import faster_rope
from mobilevlm_mlc.targets.cpu_kernels.schedule_rules import schedule_cpu_kernels
from mobilevlm_mlc.targets.cpu_kernels.silu import legalize_silu

TARGET = tvm.target.Target.from_device(tvm.cpu())


def paged_case(lengths: list[int], kv_heads: int, qo_heads: int, dim: int, page_size: int, seed: int = 0):
    """Random queries and a paged cache holding `lengths` tokens per sequence, pages shuffled."""
    rng = np.random.default_rng(seed)
    pages_per_seq = [max(1, math.ceil(n / page_size)) if n else 0 for n in lengths]
    total = sum(pages_per_seq) + 2
    order = rng.permutation(total)
    indptr, values, cursor = [0], [], 0
    for count in pages_per_seq:
        values += [int(p) for p in order[cursor : cursor + count]]
        cursor += count
        indptr.append(len(values))
    last = [n - (c - 1) * page_size if c else 0 for n, c in zip(lengths, pages_per_seq)]
    pages = rng.standard_normal((total, 2, kv_heads, page_size, dim)).astype(np.float32)
    q = rng.standard_normal((len(lengths), qo_heads, dim)).astype(np.float32)
    return q, pages, np.array(indptr, np.int32), np.array(values or [0], np.int32), np.array(last, np.int32)


def numpy_decode(q, pages, indptr, values, lengths, page_size, sm_scale):
    group = q.shape[1] // pages.shape[2]
    out, lse = np.zeros_like(q), np.full(q.shape[:2], -5e4, np.float32)
    for b, n in enumerate(lengths):
        if not n:
            continue
        seq_pages = values[indptr[b] : indptr[b + 1]]
        k = np.concatenate([pages[p, 0] for p in seq_pages], axis=1)[:, :n]  # [kv_heads, n, dim]
        v = np.concatenate([pages[p, 1] for p in seq_pages], axis=1)[:, :n]
        for h in range(q.shape[1]):
            scores = k[h // group] @ q[b, h] * sm_scale * math.log2(math.e)
            weights = np.exp2(scores - scores.max())
            out[b, h] = weights @ v[h // group] / weights.sum()
            lse[b, h] = scores.max() + math.log2(weights.sum())
    return out, lse


def run_decode(func, q, pages, indptr, values, last, sm_scale):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    batch = len(q)
    args = [
        tvm.runtime.tensor(a, dev)
        for a in (q, pages, indptr, values, last, np.zeros(batch, np.int32), np.zeros(batch, np.int32))
    ]
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32), dev)
    lib(*args, out, lse, 0, 1.0, 10000.0, sm_scale)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("kv_heads,qo_heads,prefetch", [(4, 4, True), (2, 8, True), (2, 8, False)])
def test_decode_attention_matches_numpy_and_tvm(kv_heads, qo_heads, prefetch):
    lengths, dim, page_size, sm_scale = [1, 16, 17, 70, 0], 64, 16, 64**-0.5
    q, pages, indptr, values, last = paged_case(lengths, kv_heads, qo_heads, dim, page_size)
    for b, n in enumerate(lengths):  # stale rows past a sequence's end (scored in their own lanes, masked)
        if n % page_size:
            pages[values[indptr[b + 1] - 1], :, :, n % page_size :] = np.nan
    ours = run_decode(
        decode_attention(kv_heads, qo_heads, dim, "float32", prefetch), q, pages, indptr, values, last, sm_scale
    )
    theirs = run_decode(
        _attention_decode_cpu(kv_heads, qo_heads, dim, "float32", False, {}, page_size),
        q,
        pages,
        indptr,
        values,
        last,
        sm_scale,
    )
    expected = numpy_decode(q, pages, indptr, values, lengths, page_size, sm_scale)
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("prefetch,int8_kv", [(False, False), (True, False), (False, True), (True, True)])
def test_decode_attention_keeps_tvms_parameter_names(prefetch, int8_kv):
    """Every variant takes TVM's kernel's parameters by name: `check-kernels` feeds each by its name (a
    TVMScript assignment of `pages` to an alias once renamed it `scales` in the fp16 variant)."""
    ours = decode_attention(2, 8, 64, "float16", prefetch, int8_kv)
    theirs = _attention_decode_cpu(2, 8, 64, "float16", False, {}, 16)
    assert [p.name for p in ours.params] == [p.name for p in theirs.params]


def numpy_prefill(q, keys, values, q_indptr, lengths, causal, sm_scale):
    """keys/values: per sequence [kv_heads, n, dim]; q: [total, heads, dim] with q_indptr."""
    group = q.shape[1] // keys[0].shape[0]
    out, lse = np.zeros_like(q), np.full(q.shape[:2], -5e4, np.float32)
    for b, n in enumerate(lengths):
        rows = range(q_indptr[b], q_indptr[b + 1])
        for i, t in enumerate(rows):
            visible = min(n, n - len(rows) + i + 1) if causal else n
            if visible <= 0:
                continue
            for h in range(q.shape[1]):
                scores = keys[b][h // group, :visible] @ q[t, h] * sm_scale * math.log2(math.e)
                weights = np.exp2(scores - scores.max())
                out[t, h] = weights @ values[b][h // group, :visible] / weights.sum()
                lse[t, h] = scores.max() + math.log2(weights.sum())
    return out, lse


def run_kernel(func, arrays, scalars, out_shapes, dtype="float32"):
    """`func` built for this CPU, called with `arrays`, then zeroed outputs of `out_shapes` (the first
    `dtype`, the others float32: attention's log-sum-exp), then `scalars`; the outputs."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    outs = [
        tvm.runtime.tensor(np.zeros(shape, dtype if i == 0 else np.float32), dev) for i, shape in enumerate(out_shapes)
    ]
    lib(*[tvm.runtime.tensor(a, dev) for a in arrays], *outs, *scalars)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_attention_matches_numpy_and_tvm(causal):
    kv_heads, qo_heads, dim, page_size, sm_scale = 2, 8, 64, 16, 64**-0.5
    # history longer than, equal to, shorter than the chunk; rows that see no key; tasks spanning sequences
    lengths, queries = [40, 17, 5, 3], [3, 17, 1, 6]
    _, pages, indptr, values, last = paged_case(lengths, kv_heads, qo_heads, dim, page_size, seed=1)
    q_indptr = np.cumsum([0] + queries).astype(np.int32)
    q = np.random.default_rng(2).standard_normal((q_indptr[-1], qo_heads, dim)).astype(np.float32)
    keys = [
        np.concatenate([pages[p, 0] for p in values[indptr[b] : indptr[b + 1]]], axis=1) for b in range(len(lengths))
    ]
    vals = [
        np.concatenate([pages[p, 1] for p in values[indptr[b] : indptr[b + 1]]], axis=1) for b in range(len(lengths))
    ]
    expected = numpy_prefill(q, keys, vals, q_indptr, lengths, causal, sm_scale)
    zeros = np.zeros(len(lengths), np.int32)
    arrays = [q, q_indptr, pages, indptr, values, last, zeros, np.zeros(len(q), np.int32)]
    shapes = [q.shape, q.shape[:2]]
    scalars = [causal, 0, 1.0, 10000.0, sm_scale]
    ours = run_kernel(prefill_attention(kv_heads, qo_heads, dim, "float32", page_size), arrays, scalars, shapes)
    theirs = run_kernel(
        _attention_prefill_cpu(kv_heads, qo_heads, dim, "float32", False, {}, page_size), arrays, scalars, shapes
    )
    np.testing.assert_allclose(ours[0], expected[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ours[1], expected[1], rtol=2e-5, atol=2e-5)
    seen = expected[1] > -5e4  # rows that see a key (a row that sees none: 0 and -5e4 here, NaN in TVM's kernel)
    assert causal == 0 or not seen.all()
    np.testing.assert_allclose(theirs[0][seen], expected[0][seen], rtol=2e-5, atol=2e-6)


def test_ragged_prefill_attention_matches_numpy_and_tvm():
    kv_heads, qo_heads, dim, sm_scale = 2, 8, 64, 64**-0.5
    rng = np.random.default_rng(3)
    lengths = [9, 24]
    q_indptr = kv_indptr = np.cumsum([0] + lengths).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], qo_heads, dim)).astype(np.float32)
    k = rng.standard_normal((kv_indptr[-1], kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((kv_indptr[-1], kv_heads, dim)).astype(np.float32)
    keys = [k[kv_indptr[b] : kv_indptr[b + 1]].transpose(1, 0, 2) for b in range(2)]
    vals = [v[kv_indptr[b] : kv_indptr[b + 1]].transpose(1, 0, 2) for b in range(2)]
    expected = numpy_prefill(q, keys, vals, q_indptr, lengths, 1, sm_scale)
    arrays = [q, q_indptr, k, v, kv_indptr, np.zeros(len(q), np.int32), np.zeros(2, np.int32)]
    shapes, scalars = [q.shape, q.shape[:2]], [1, 0, 1.0, 10000.0, sm_scale]
    ours = run_kernel(prefill_ragged_attention(kv_heads, qo_heads, dim, "float32"), arrays, scalars, shapes)
    theirs = run_kernel(
        _attention_prefill_ragged_cpu(kv_heads, qo_heads, dim, dim, "float32", {}), arrays, scalars, shapes
    )
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=2e-5)


# a CPU of each instruction set, for LLVM (the kernels are built for it whatever this host is)
DOT_CPUS = {
    "avx512-vnni": ("x86_64-pc-linux-gnu", "cascadelake"),
    "avx-vnni": ("x86_64-pc-linux-gnu", "alderlake"),
    "avx2": ("x86_64-pc-linux-gnu", "haswell"),
    "neon-dotprod": ("aarch64-linux-gnu", "cortex-a78"),
}


HOST_FLAGS = set(cpu_features())  # /proc/cpuinfo, as bench records it


def dot_target(dot: Int8Dot) -> tvm.target.Target:
    triple, mcpu = DOT_CPUS[dot.name]
    return tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})


def test_each_cpu_gets_its_best_dot_product_and_tiling():
    assert [int8_dot(dot_target(d)) for d in INT8_DOTS] == list(INT8_DOTS)
    # fp32 kernels tiled for the widest vectors: 16 lanes with 32 zmm, 8 with AVX2's 16 ymm
    assert [x86_kernels(dot_target(d)).lanes for d in INT8_DOTS[:3]] == [16, 8, 8]
    assert int8_dot(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})) is None  # SSE2 only
    armv8_0 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert int8_dot(armv8_0) is None  # Raspberry Pi 4: no dotprod
    phone = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a55"})
    assert int8_dot(phone).name == "neon-dotprod"


def int8_case(kernel: str, rows: int, dtype: str, k: int = 96, n: int = 192):
    """Random x (rows of scales 1e-3 to 1e3, an all-zero group) and NK64 weights for `kernel`, and the
    two answers: x rounded by the reference's `int8_activations` times the dequantized weight, and
    unrounded x times it."""
    rng = np.random.default_rng(rows)
    scheme = QUANTIZATIONS["q4f32_3" if dtype == "float32" else "q4f16_3"].scheme
    q_weight, q_scale = quantize_weight(rng.standard_normal((n, k)).astype(np.float32), scheme)
    weight = dequantize_weight(q_weight, q_scale, scheme).astype(np.float64)
    x = (rng.standard_normal((1, rows, k)) * 10.0 ** rng.uniform(-3, 3, (1, rows, 1))).astype(dtype)
    x[0, 0, 32:64] = 0
    rounded = int8_activations(torch.from_numpy(x.astype(np.float32))).numpy()[0].astype(np.float64)
    return (x, q_weight, q_scale), rounded @ weight.T, x[0].astype(np.float64) @ weight.T


def check_int8_result(got: np.ndarray, emulated: np.ndarray, exact: np.ndarray, dtype: str) -> None:
    """Equal to the emulation up to fp32 summation order; off the unrounded product by the rounding alone
    (under 1%, never exact)."""
    got = got[0].astype(np.float64)
    scale = np.abs(exact).max(axis=1, keepdims=True)  # per row: rows differ by 10^6 in magnitude
    tolerance = 1e-5 if dtype == "float32" else 1e-3  # fp16 output: half an ulp is 2^-11 of the value
    assert np.all(np.abs(got - emulated) <= tolerance * scale)
    assert np.all(np.abs(got - exact) < 1e-2 * scale) and np.all(np.abs(got - exact).max(axis=1) > 0)


def int8_kernel(kernel: str, rows: int, dtype: str, dot: Int8Dot, k: int = 96, n: int = 192) -> tirx.PrimFunc:
    return int8_quantized_gemv(k, n, dtype, dot) if kernel == "gemv" else int8_quantized_matmul(k, n, dtype, dot)


INT8_CASES = [
    ("gemm", 1, "float32"),  # rows <= 8: the skinny path (batch decode)
    ("gemm", 3, "float32"),
    ("gemm", 5, "float16"),
    ("gemm", 8, "float32"),
    ("gemm", 9, "float32"),  # the unpacked-tile GEMM (prefill)
    ("gemm", 13, "float16"),
    ("gemv", 1, "float32"),
    ("gemv", 1, "float16"),
]


@pytest.mark.parametrize("dot", INT8_DOTS, ids=lambda d: d.name)
@pytest.mark.parametrize("kernel,rows,dtype", INT8_CASES)
def test_int8_matmuls_match_their_emulation(dot, kernel, rows, dtype):
    """Each instruction set's kernels: their code holds its dot-product instruction (disassembly), and
    where this CPU has it they run against the emulation of their rounding (rows not a multiple of the
    GEMM's or the skinny path's blocks; fp16 activations and scales read into fp32, the result rounded to
    fp16). The Arm kernels run under qemu-user in `test_arm.py`."""
    lib = tvm.compile(tvm.IRModule({"main": int8_kernel(kernel, rows, dtype, dot)}), target=dot_target(dot))
    asm = lib.mod.inspect_source("asm")
    instructions = set(re.findall(r"^\s+(?:\{vex\}\s+)?([a-z][a-z0-9.]*)", asm, re.M))
    assert dot.instruction in instructions
    if dot.name == "neon-dotprod":
        assert "sdot" in instructions and not instructions & {"usdot", "smmla"}  # Armv8.2 dotprod only
        pytest.skip("compiled and disassembled; run under qemu-user in test_arm.py")
    assert any("zmm" in line for line in asm.splitlines()) == (dot.lanes == 16)
    assert ("vpdpbusd" in instructions) == (dot.name != "avx2")  # AVX2 has no byte dot product
    assert any(r.startswith("vpmaddubsw") for r in instructions) == (dot.name == "avx2")
    if dot.cpu_flag not in HOST_FLAGS:
        pytest.skip(f"compiled and disassembled; this CPU has no {dot.name} to run it")
    (x, q_weight, q_scale), emulated, exact = int8_case(kernel, rows, dtype)
    out = tvm.runtime.tensor(np.zeros((1, rows, 192), dtype), tvm.cpu())
    lib(*[tvm.runtime.tensor(a, tvm.cpu()) for a in (x, q_weight, q_scale)], out)
    check_int8_result(out.numpy(), emulated, exact, dtype)


@pytest.mark.parametrize("dtype,kv_heads", [("float32", 4), ("float16", 2)])
def test_rope_matches_tvm_and_only_replaces_the_default_variant(dtype, kv_heads):
    """Our RoPE against TVM's (the kernel it replaces) on shuffled positions, rotation on and off; a
    scaled or llama3 RoPE is left to TVM."""
    heads, dim, tokens = 4, 64, 21
    theirs = llama_rope_with_position_map(10000.0, 1.0, dim, heads, kv_heads, dtype, {}, dim)
    ours = faster_rope(theirs)
    assert ours is not None
    assert faster_rope(llama_rope_with_position_map(10000.0, 2.0, dim, heads, kv_heads, dtype, {}, dim)) is None
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert faster_rope(llama_rope_with_position_map(500000.0, 1.0, dim, heads, kv_heads, dtype, llama3, dim)) is None
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((tokens, heads + 2 * kv_heads, dim)).astype(dtype)
    positions = rng.permutation(400)[:tokens].astype(np.int32)
    for apply_rope in (1, 0):
        results = []
        for func in (ours, theirs):
            lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
            outs = [tvm.runtime.tensor(np.zeros((tokens, h, dim), dtype)) for h in (heads, kv_heads, kv_heads)]
            lib(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, apply_rope)
            results.append([o.numpy().astype(np.float32) for o in outs])
        for got, expected in zip(*results):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        assert np.array_equal(results[0][2], qkv[:, heads + kv_heads :].astype(np.float32))  # v copied
        assert np.array_equal(results[0][0], qkv[:, :heads].astype(np.float32)) == (apply_rope == 0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_silu_vectorizes_and_matches_numpy(dtype):
    """`cpu_pipeline`'s SiLU (TOPI's polynomial exp, in fp32): no libm call per element, and equal to
    x / (1 + e^-x) within fp32 rounding (fp16: the result's rounding)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5632), dtype))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.silu(x)))
    mod = relax.transform.LegalizeOps({"relax.nn.silu": legalize_silu})(bb.finalize())
    lib = tvm.compile(mod, target=TARGET)
    [kernels] = [m for m in lib.mod.imports if m.kind == "llvm"]
    assert "llvm.exp." not in kernels.inspect_source("ll")  # TVM's sigmoid: an exp LLVM lowers to libm per element
    values = np.random.default_rng(0).uniform(-30, 30, (1, 4, 5632)).astype(dtype)
    values[0, 0, :4] = [-100, 100, 0, -0.0]
    vm = relax.VirtualMachine(lib, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(values, tvm.cpu())).numpy().astype(np.float64)
    wide = values.astype(np.float64)
    expected = wide / (1 + np.exp(-wide))
    tiny = float(np.finfo(dtype).tiny)  # below the smallest normal number the dtype flushes or rounds away
    np.testing.assert_allclose(got, expected, rtol=2e-6 if dtype == "float32" else 1e-3, atol=tiny)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_reductions_run_in_simd_lanes_and_match_numpy(dtype):
    """RMSNorm, LayerNorm and a row softmax through `RowReduction`: a reduction along a row that divides
    into vectors is factored into one vector of partial sums (an `_rf` block, lanes vectorized) — one
    scalar chain waited on the add's latency per element — and every row count gives numpy's result."""
    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 2048), dtype))
    w = relax.Var("w", relax.TensorType((2048,), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            rms = bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-6))
            layer = bb.emit(relax.op.nn.layer_norm(x, w, w, axes=[-1], epsilon=1e-5))
            soft = bb.emit(relax.op.nn.softmax(relax.op.astype(x, "float32"), axis=-1))
            out = bb.emit_output(relax.Tuple([rms, layer, soft]))
        bb.emit_func_output(out)
    config = x86_kernels(TARGET)
    with TARGET:
        mod = schedule_cpu_kernels(config)(relax.transform.LegalizeOps()(bb.finalize()))
    factored = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert func.attrs.get("tirx.is_scheduled"), gv.name_hint
            sch = s_tir.Schedule(func)
            for block in sch.get_child_blocks(sch.get_sblock("root")):
                if sch.get(block).name_hint.endswith("_rf"):
                    assert sch.get(sch.get_loops(block)[-1]).kind == tirx.ForKind.VECTORIZED
                    assert int(sch.get(sch.get_loops(block)[-1]).extent) == config.lanes
                    factored.append(gv.name_hint)
    assert any("rms_norm" in name for name in factored) and any("softmax" in name for name in factored)
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 1.5, 2048).astype(dtype)
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    for rows in (1, 8, 33):
        values = (rng.standard_normal((rows, 2048)) * 3).astype(dtype)
        got = [t.numpy().astype(np.float64) for t in vm["main"](tvm.runtime.tensor(values), tvm.runtime.tensor(weight))]
        wide, scale = values.astype(np.float64), weight.astype(np.float64)
        centered = wide - wide.mean(-1, keepdims=True)
        exps = np.exp(wide - wide.max(-1, keepdims=True))
        expected = [
            wide / np.sqrt((wide**2).mean(-1, keepdims=True) + 1e-6) * scale,
            centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * scale + scale,
            exps / exps.sum(-1, keepdims=True),
        ]
        for name, a, b in zip(("rms_norm", "layer_norm", "softmax"), got, expected):
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, err_msg=f"{name}, {rows} rows")


def int8_cache(kv_heads: int, dim: int, tokens: list[np.ndarray], num_pages: int, seed: int = 0):
    """An fp16 page pool, garbage-filled (as the runtime leaves fresh pages), with `tokens` (per
    sequence [n, 2, kv_heads, dim]: K and V) appended by the 8-bit `transpose_append` at shuffled pages;
    returns the pool, the page table (indptr, values), the last pages' lengths, and the position map."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 1 << 16, (num_pages, 2, kv_heads, KV_PAGE_SIZE, dim), dtype=np.uint16).view(np.float16)
    order, indptr, values, positions, last = rng.permutation(num_pages), [0], [], [], []
    for seq in tokens:
        pages = [int(p) for p in order[len(values) : len(values) + math.ceil(len(seq) / KV_PAGE_SIZE)]]
        values += pages
        indptr.append(len(values))
        positions += [pages[t // KV_PAGE_SIZE] * KV_PAGE_SIZE + t % KV_PAGE_SIZE for t in range(len(seq))]
        last.append(len(seq) - (len(pages) - 1) * KV_PAGE_SIZE if pages else 0)
    rows = np.concatenate(tokens).astype(np.float16)
    dev = tvm.cpu()
    pool_t = tvm.runtime.tensor(pool, dev)
    append = tvm.compile(tvm.IRModule({"main": int8_kv.transpose_append(kv_heads, dim, "float16")}), target=TARGET)
    args = (rows[:, 0], rows[:, 1], np.array(positions + [-1], np.int32)[:-1])
    append(pool_t, *[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args])
    return pool_t, np.array(indptr, np.int32), np.array(values or [0], np.int32), np.array(last, np.int32), positions


def read_int8_cache(pool, positions: list[int], kv_heads: int, dim: int, layers: int = 1) -> np.ndarray:
    """The 8-bit cache at `positions` through its `debug_get_kv`, dequantized: [n, 2, kv_heads, dim]."""
    get = tvm.compile(tvm.IRModule({"main": int8_kv.debug_get_kv(layers, kv_heads, dim, "float16")}), target=TARGET)
    dev = tvm.cpu()
    k, v = (tvm.runtime.tensor(np.zeros((layers, len(positions), kv_heads, dim), np.float16), dev) for _ in range(2))
    get(pool, tvm.runtime.tensor(np.array(positions, np.int32), dev), k, v, layers - 1)
    return np.stack([k.numpy()[-1], v.numpy()[-1]], axis=1).astype(np.float32)


def test_int8_kv_cache_appends_within_half_a_step_and_reads_back():
    kv_heads, dim = 2, 64
    rng = np.random.default_rng(0)
    seqs = [
        rng.standard_normal((n, 2, kv_heads, dim)) * rng.uniform(0.01, 30, (n, 2, kv_heads, 1)) for n in (1, 16, 21)
    ]
    seqs[2][5] = 0  # an all-zero row: scale 0, reads back 0
    pool, _, _, _, positions = int8_cache(kv_heads, dim, seqs, num_pages=6)
    stored = read_int8_cache(pool, positions, kv_heads, dim, layers=3)
    exact = np.concatenate(seqs).astype(np.float16).astype(np.float32)
    step = np.abs(exact).max(-1, keepdims=True) / 127  # each row's own quantization step
    assert (np.abs(stored - exact) <= step * 0.5 + np.abs(exact) * 2e-3 + 1e-7).all()  # + fp16 rounding of the read
    assert (np.abs(stored - exact) > step * 0.1).mean() > 0.5  # it is quantized, not a copy
    assert (stored[1 + 16 + 5] == 0).all()
    # every row's largest element is exact up to fp16: the scale is max |x| / 127
    np.testing.assert_allclose(np.abs(stored).max(-1), np.abs(exact).max(-1), rtol=2e-3)


@pytest.mark.parametrize("kv_heads,qo_heads", [(4, 4), (2, 8)])
def test_int8_kv_decode_attention_matches_numpy_on_the_stored_cache(kv_heads, qo_heads):
    dim, sm_scale, lengths = 64, 64**-0.5, [1, 16, 17, 70, 0]
    rng = np.random.default_rng(1)
    seqs = [rng.standard_normal((n, 2, kv_heads, dim)) for n in lengths]
    pool, indptr, values, last, positions = int8_cache(kv_heads, dim, seqs, num_pages=12)
    stored = read_int8_cache(pool, positions, kv_heads, dim)
    # numpy's decode over the dequantized rows, laid out one sequence per page run
    pages = np.zeros((pool.shape[0], 2, kv_heads, KV_PAGE_SIZE, dim), np.float32)
    for p, position in enumerate(positions):
        pages[position // KV_PAGE_SIZE, :, :, position % KV_PAGE_SIZE] = stored[p]
    q = rng.standard_normal((len(lengths), qo_heads, dim)).astype(np.float32)
    expected = numpy_decode(q, pages, indptr, values, lengths, KV_PAGE_SIZE, sm_scale)
    exact_pages = np.zeros_like(pages)
    for p, position in enumerate(positions):
        exact_pages[position // KV_PAGE_SIZE, :, :, position % KV_PAGE_SIZE] = np.concatenate(seqs)[p]
    exact = numpy_decode(q, exact_pages, indptr, values, lengths, KV_PAGE_SIZE, sm_scale)
    for prefetch in (True, False):
        lib = tvm.compile(
            tvm.IRModule({"main": decode_attention(kv_heads, qo_heads, dim, "float16", prefetch, int8_kv=True)}),
            target=TARGET,
        )
        dev = tvm.cpu()
        batch = len(q)
        out = tvm.runtime.tensor(np.zeros(q.shape, np.float16), dev)
        lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32), dev)
        args = [q.astype(np.float16), indptr, values, last, np.zeros(batch, np.int32), np.zeros(batch, np.int32)]
        lib(
            tvm.runtime.tensor(args[0], dev),
            pool,
            *[tvm.runtime.tensor(a, dev) for a in args[1:]],
            out,
            lse,
            0,
            1.0,
            10000.0,
            sm_scale,
        )
        got = out.numpy().astype(np.float32)
        np.testing.assert_allclose(got, expected[0], rtol=2e-3, atol=2e-3)  # fp16 queries and output
        np.testing.assert_allclose(lse.numpy(), expected[1], rtol=1e-3, atol=2e-3)
        assert 1e-3 < np.abs(got - exact[0]).max() < 0.05  # the 8-bit cache's own error, against fp32 K and V


def test_int8_kv_paged_prefill_matches_numpy_on_the_stored_cache():
    kv_heads, qo_heads, dim, sm_scale = 2, 8, 64, 64**-0.5
    lengths, queries = [40, 17, 5, 3], [3, 17, 1, 6]
    rng = np.random.default_rng(4)
    seqs = [rng.standard_normal((n, 2, kv_heads, dim)) for n in lengths]
    pool, indptr, values, last, positions = int8_cache(kv_heads, dim, seqs, num_pages=9)
    stored = read_int8_cache(pool, positions, kv_heads, dim)
    starts = np.cumsum([0] + lengths)
    keys = [stored[a:b, 0].transpose(1, 0, 2) for a, b in zip(starts, starts[1:])]
    vals = [stored[a:b, 1].transpose(1, 0, 2) for a, b in zip(starts, starts[1:])]
    q_indptr = np.cumsum([0] + queries).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], qo_heads, dim)).astype(np.float32)
    expected = numpy_prefill(q, keys, vals, q_indptr, lengths, 1, sm_scale)
    zeros = np.zeros(len(lengths), np.int32)
    arrays = [q.astype(np.float16), q_indptr, pool.numpy(), indptr, values, last, zeros, np.zeros(len(q), np.int32)]
    func = prefill_attention(kv_heads, qo_heads, dim, "float16", KV_PAGE_SIZE, int8_kv=True)
    out, lse = run_kernel(func, arrays, [1, 0, 1.0, 10000.0, sm_scale], [q.shape, q.shape[:2]], "float16")
    np.testing.assert_allclose(out.astype(np.float32), expected[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(lse, expected[1], rtol=1e-3, atol=2e-3)


def test_int8_kv_page_copies_move_values_and_scales():
    """A fork's page copy, then compaction (tokens moved to other positions): both read back as the
    rows they copied."""
    kv_heads, dim = 2, 64
    rng = np.random.default_rng(5)
    pool, _, values, _, positions = int8_cache(kv_heads, dim, [rng.standard_normal((21, 2, kv_heads, dim))], 4)
    before = read_int8_cache(pool, positions, kv_heads, dim)
    spare = next(p for p in range(4) if p not in values[:2])
    copy = tvm.compile(tvm.IRModule({"main": int8_kv.copy_single_page(kv_heads, dim, "float16")}), target=TARGET)
    copy(pool, int(values[1]), spare, 5)  # the second page holds tokens 16-20
    copied = [spare * KV_PAGE_SIZE + t for t in range(5)]
    np.testing.assert_array_equal(read_int8_cache(pool, copied, kv_heads, dim), before[16:21])
    compact = tvm.compile(tvm.IRModule({"main": int8_kv.compact_copy(kv_heads, dim, "float16")}), target=TARGET)
    src, dst = positions[3:6], positions[0:3]  # tokens 3-5 moved to 0-2 (as after rejected draft tokens)
    dev = tvm.cpu()
    compact(
        pool,
        tvm.runtime.tensor(np.array([0, 3], np.int32), dev),
        tvm.runtime.tensor(np.array([src, dst], np.int32), dev),
        1,
    )
    np.testing.assert_array_equal(read_int8_cache(pool, dst, kv_heads, dim), before[3:6])
