"""MLC's GPU sampler functions (`targets/passes/attach_gpu_sampler.py`), called with the arguments and
dtypes `cpp/serve/sampler/gpu_sampler.cc` passes, against numpy. CUDA libraries carry them (checked in
test_targets.py); no GPU here, so the same Relax functions are built for this CPU and run."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from mobilevlm_mlc.formats.mlc_contract import GPU_SAMPLER_FUNCTIONS, check_contract
from mobilevlm_mlc.targets.passes.attach_gpu_sampler import add_sampler_functions

VOCAB = 32000


@pytest.fixture(scope="module")
def sampler():
    vm = relax.VirtualMachine(relax.build(add_sampler_functions(tvm.IRModule()), target="llvm"), tvm.cpu())

    def call(name: str, *arrays: np.ndarray):
        out = vm[name](*(tvm.runtime.tensor(a, tvm.cpu()) for a in arrays))
        return out.numpy() if isinstance(out, tvm.runtime.Tensor) else tuple(o.numpy() for o in out)

    return call


@pytest.fixture(scope="module")
def probs() -> np.ndarray:
    """Four rows as a model gives them: peaked, flat, one certain token, and tied probabilities."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, VOCAB)) * np.array([[6.0], [0.5], [1.0], [1.0]])
    logits[2, 17] = 60.0
    logits[3, :] = np.repeat(rng.normal(size=VOCAB // 8), 8) * 4  # groups of 8 equal probabilities
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype("float32")


def _draw(row: np.ndarray, u: float) -> int:
    """The first token whose cumulative probability exceeds u (within float rounding of the cumsum)."""
    return int(np.searchsorted(np.cumsum(row, dtype=np.float64), u, side="right").clip(max=len(row) - 1))


def _nucleus(row: np.ndarray, top_p: float) -> np.ndarray:
    """Mask of the tokens MLC keeps: every probability at least the smallest one of the shortest
    descending prefix whose sum reaches top_p."""
    if top_p >= 1.0:
        return np.ones_like(row, dtype=bool)  # all of it (a float32 running sum stops just short of 1)
    descending = np.sort(row)[::-1]
    rank = min(int(np.searchsorted(np.cumsum(descending, dtype=np.float64), top_p, side="left")), len(row) - 1)
    return row >= descending[rank]


def _samples(n_rows: int):
    rows = np.repeat(np.arange(n_rows, dtype="int32"), 3)
    uniform = np.tile(np.array([0.03, 0.5, 0.97], "float32"), n_rows)
    return uniform, rows


def test_multinomial_from_uniform(sampler, probs):
    uniform, rows = _samples(len(probs))
    drawn = sampler("multinomial_from_uniform", probs, uniform, rows)
    assert drawn.dtype == np.int32 and drawn.shape == rows.shape
    assert drawn.tolist() == [_draw(probs[r], u) for r, u in zip(rows, uniform)]
    assert (drawn[rows == 2] == 17).all()  # the certain token, whatever the draw


def test_argsort_probs(sampler, probs):
    values, indices = sampler("argsort_probs", probs)
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(values, np.sort(probs, axis=1)[:, ::-1])
    np.testing.assert_array_equal(np.take_along_axis(probs, indices, axis=1), values)
    assert (np.sort(indices, axis=1) == np.arange(VOCAB)).all()  # a permutation of each row


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_sample_with_top_p(sampler, probs, top_p):
    values, indices = sampler("argsort_probs", probs)
    uniform, rows = _samples(len(probs))
    top_ps = np.full(len(probs), top_p, "float32")
    drawn = sampler("sample_with_top_p", values, indices, uniform, rows, top_ps)
    for token, r, u in zip(drawn, rows, uniform):
        kept = _nucleus(probs[r], top_p)
        assert kept[token], (r, u)  # never outside the nucleus
        ranked = values[r] * kept[indices[r]]  # the nucleus in rank order, renormalized
        expected = indices[r, _draw(ranked / ranked.sum(dtype=np.float64), u)]
        assert probs[r, token] == probs[r, expected]  # the same token, or one tied with it


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])  # the engine renormalizes only below 1
def test_renormalize_by_top_p(sampler, probs, top_p):
    top_ps = np.full(len(probs), top_p, "float32")
    pivots = np.zeros((len(probs), 3), "float32")  # the engine's guesses; not needed here
    renormed = sampler("renormalize_by_top_p", probs, top_ps, pivots)
    for row, out in zip(probs, renormed):
        kept = _nucleus(row, top_p)
        normal = row >= np.finfo(np.float32).tiny  # a subnormal probability may flush to 0
        np.testing.assert_array_equal((out > 0)[normal], kept[normal])
        np.testing.assert_allclose(
            out[kept], row[kept] / row[kept].sum(dtype=np.float64), rtol=1e-4
        )  # a float32 sum of 32000 terms
    assert (renormed[3] > 0).sum() % 8 == 0  # the tied row is cut at a whole group of equal probabilities


def test_sampler_take_probs(sampler, probs):
    _, indices = sampler("argsort_probs", probs)
    uniform, rows = _samples(len(probs))
    drawn = sampler("multinomial_from_uniform", probs, uniform, rows)
    offsets = np.array([0, 1, 4, VOCAB, VOCAB + 2, 3 * VOCAB + 5], "int32")  # row * vocab + rank
    sampled, top_probs, top_tokens = sampler("sampler_take_probs", probs, indices, rows, drawn, offsets)
    np.testing.assert_array_equal(sampled, probs[rows, drawn])
    np.testing.assert_array_equal(top_tokens, indices.reshape(-1)[offsets])
    np.testing.assert_array_equal(top_probs, probs[offsets // VOCAB, top_tokens])


def test_contract_asks_gpu_libraries_for_the_sampler():
    vm_functions = dict.fromkeys(["embed"], 2)
    missing = [p for p in check_contract(vm_functions, set(), {}, {"cuda"}) if "multinomial" in p or "top_p" in p]
    assert missing == [
        "no function 'multinomial_from_uniform'",
        "no function 'sample_with_top_p'",
        "no function 'renormalize_by_top_p'",
    ]
    assert not any("argsort" in p for p in check_contract(vm_functions, set(), {}, {"opencl"}))
    assert GPU_SAMPLER_FUNCTIONS["sample_with_top_p"] == 5  # as gpu_sampler.cc passes them
