"""The CPU kernels of `targets/`: our decode attention against numpy and against TVM's own CPU kernel
on the same paged KV cache layout; each schedule rule against the unscheduled kernel on real shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

from targets.cpu_attention import decode_attention

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
