"""The engine's weights on the host: the huge-page arena (`runtime/host_memory.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache
from mobilevlm_mlc.runtime.host_memory import ALIGNMENT, CHUNK, HUGE_PAGE, HugePageArena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def address(tensor: tvm.runtime.Tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


def test_arena_tensors_are_exact_aligned_and_apart():
    arena, rng = HugePageArena(), np.random.default_rng(0)
    arrays = [
        rng.standard_normal((3, 5)).astype(np.float16),
        rng.integers(0, 2**32, (7, 64), dtype=np.uint32),
        rng.standard_normal(1).astype(np.float32),
        rng.integers(-9, 9, (2, 3, 4), dtype=np.int32),
        np.ones((CHUNK // 4 + 1,), np.float32),  # more than a chunk: a mapping of its own
    ]
    tensors = [arena.tensor(a) for a in arrays]
    for a, t in zip(arrays, tensors):
        assert t.dtype == str(a.dtype) and tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.numpy(), a)
        assert address(t) % ALIGNMENT == 0
    assert address(tensors[0]) % HUGE_PAGE == 0  # a mapping starts on a 2 MiB boundary
    spans = sorted((address(t), address(t) + a.nbytes) for a, t in zip(arrays, tensors))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two overlap
    del arena  # the tensors keep their memory
    np.testing.assert_array_equal(tensors[1].numpy(), arrays[1])


def test_engine_weights_are_in_huge_page_mappings(ldpnet_engine, ldpnet_built):
    """Every weight of a local CPU engine lies in an arena mapping, which Linux may back with huge pages
    when its transparent huge pages are on; they equal the dist's weights loaded the ordinary way."""
    ordinary = load_tensor_cache(ldpnet_built.dist, tvm.cpu())
    names = [spec["name"] for spec in ldpnet_engine.metadata["params"]]
    for name, tensor in zip(names, ldpnet_engine._param_tensors):
        np.testing.assert_array_equal(tensor.numpy(), ordinary[name].numpy())
    if not sys.platform.startswith("linux") or "[never]" in THP.read_text():
        pytest.skip("no transparent huge pages here")
    eligible = {}
    region = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and not line.split()[0].endswith(":"):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            region = (lo, hi)
        elif line.startswith("THPeligible:"):
            eligible[region] = line.split()[1] == "1"
    for tensor in ldpnet_engine._param_tensors:
        at = address(tensor)
        (where,) = [r for r in eligible if r[0] <= at < r[1]]
        assert eligible[where], f"weight at {at:#x} lies in a mapping not eligible for huge pages"
