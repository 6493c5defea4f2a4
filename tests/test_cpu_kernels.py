"""The CPU kernels of `targets/`: our decode attention against numpy and against TVM's own CPU kernel
on the same paged KV cache layout; each schedule rule against the unscheduled kernel on real shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

from targets.cpu_attention import decode_attention, prefill_attention, prefill_ragged_attention

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
    args = [tvm.runtime.tensor(a, dev) for a in (q, pages, indptr, values, last, np.zeros(batch, np.int32), np.zeros(batch, np.int32))]
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32), dev)
    lib(*args, out, lse, 0, 1.0, 10000.0, sm_scale)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("kv_heads,qo_heads", [(4, 4), (2, 8)])
def test_decode_attention_matches_numpy_and_tvm(kv_heads, qo_heads):
    lengths, dim, page_size, sm_scale = [1, 16, 17, 70, 0], 64, 16, 64**-0.5
    q, pages, indptr, values, last = paged_case(lengths, kv_heads, qo_heads, dim, page_size)
    ours = run_decode(decode_attention(kv_heads, qo_heads, dim, "float32", 16, page_size), q, pages, indptr, values, last, sm_scale)
    theirs = run_decode(_attention_decode_cpu(kv_heads, qo_heads, dim, "float32", False, {}, page_size), q, pages, indptr, values, last, sm_scale)
    expected = numpy_decode(q, pages, indptr, values, lengths, page_size, sm_scale)
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=2e-5)


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


def run_kernel(func, arrays, scalars, out_shapes):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, np.float32), dev) for shape in out_shapes]
    lib(*[tvm.runtime.tensor(a, dev) for a in arrays], *outs, *scalars)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_attention_matches_numpy_and_tvm(causal):
    kv_heads, qo_heads, dim, page_size, sm_scale = 2, 8, 64, 16, 64**-0.5
    lengths, queries = [40, 17, 5], [3, 17, 1]  # history longer than, equal to and shorter than the chunk
    _, pages, indptr, values, last = paged_case(lengths, kv_heads, qo_heads, dim, page_size, seed=1)
    q_indptr = np.cumsum([0] + queries).astype(np.int32)
    q = np.random.default_rng(2).standard_normal((q_indptr[-1], qo_heads, dim)).astype(np.float32)
    keys = [np.concatenate([pages[p, 0] for p in values[indptr[b]:indptr[b + 1]]], axis=1) for b in range(3)]
    vals = [np.concatenate([pages[p, 1] for p in values[indptr[b]:indptr[b + 1]]], axis=1) for b in range(3)]
    expected = numpy_prefill(q, keys, vals, q_indptr, lengths, causal, sm_scale)
    zeros = np.zeros(3, np.int32)
    arrays = [q, q_indptr, pages, indptr, values, last, zeros, np.zeros(len(q), np.int32)]
    shapes = [q.shape, q.shape[:2]]
    scalars = [causal, 0, 1.0, 10000.0, sm_scale]
    ours = run_kernel(prefill_attention(kv_heads, qo_heads, dim, "float32", 16, page_size), arrays, scalars, shapes)
    theirs = run_kernel(_attention_prefill_cpu(kv_heads, qo_heads, dim, "float32", False, {}, page_size), arrays, scalars, shapes)
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ours[1], expected[1], rtol=2e-5, atol=2e-5)


def test_ragged_prefill_attention_matches_numpy_and_tvm():
    kv_heads, qo_heads, dim, sm_scale = 2, 8, 64, 64**-0.5
    rng = np.random.default_rng(3)
    lengths = [9, 24]
    q_indptr = kv_indptr = np.cumsum([0] + lengths).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], qo_heads, dim)).astype(np.float32)
    k = rng.standard_normal((kv_indptr[-1], kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((kv_indptr[-1], kv_heads, dim)).astype(np.float32)
    keys = [k[kv_indptr[b]:kv_indptr[b + 1]].transpose(1, 0, 2) for b in range(2)]
    vals = [v[kv_indptr[b]:kv_indptr[b + 1]].transpose(1, 0, 2) for b in range(2)]
    expected = numpy_prefill(q, keys, vals, q_indptr, lengths, 1, sm_scale)
    arrays = [q, q_indptr, k, v, kv_indptr, np.zeros(len(q), np.int32), np.zeros(2, np.int32)]
    shapes, scalars = [q.shape, q.shape[:2]], [1, 0, 1.0, 10000.0, sm_scale]
    ours = run_kernel(prefill_ragged_attention(kv_heads, qo_heads, dim, "float32", 16), arrays, scalars, shapes)
    theirs = run_kernel(_attention_prefill_ragged_cpu(kv_heads, qo_heads, dim, dim, "float32", {}), arrays, scalars, shapes)
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=2e-5)
