"""A library built with `--kv-cache int8` (K and V in 8 bits inside the fp16/fp32 pages) against the
PyTorch reference and against itself: the quantized cache's error is bounded, and every path that
writes or reads pages (decode, prefill over cached pages, a fork inside a page) stays consistent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig

from .helpers import DEMO_IMAGE, REL_TOL, reference_for, rel_err

QUESTION = "What is in the image?"
# the 8-bit cache's error at the logits, relative to their largest magnitude: measured 1.0e-3 (turn 2's
# first logits) and 3.8-6.3e-3 (12 decode steps) on the random-weight test model, one scale per token and
# head; an fp32 cache stays under REL_TOL (1e-4)
INT8_KV_TOL = 2e-2

pytestmark = pytest.mark.slow  # compiles


@pytest.fixture(scope="module")
def int8_engine(ldpnet_built, workspace) -> Engine:
    lib = workspace / "ldpnet-q0f32-kv-int8.so"
    if not lib.exists():
        compile_model(ldpnet_built.dist, "cpu", lib, kv_cache="int8")
    return Engine(ldpnet_built.dist, lib)


@pytest.fixture(scope="module")
def reference_ldpnet(workspace):
    return reference_for(workspace, "ldpnet")


def test_library_records_its_kv_cache(int8_engine, ldpnet_engine):
    assert int8_engine.metadata["build"]["kv_cache_dtype"] == "int8"
    assert ldpnet_engine.metadata["build"]["kv_cache_dtype"] == "float32"


def test_two_turns_match_the_reference_within_the_8_bit_error(int8_engine, ldpnet_engine, reference_ldpnet):
    """Turn 1 prefills over its own chunk and decodes over 8-bit pages; turn 2 prefills over turn 1's
    pages (the paged prefill kernel): both turns' first logits are near PyTorch's fp32, and not equal."""
    image = Image.open(DEMO_IMAGE)
    follow_up = "And what colour is the roof?"
    turns = {}
    for name, engine in (("int8", int8_engine), ("fp32", ldpnet_engine)):
        with engine.chat() as session:
            list(session.send(QUESTION, image, GenerationConfig(max_new_tokens=6)))
            first = session.last
            list(session.send(follow_up, None, GenerationConfig(max_new_tokens=6)))
            turns[name] = (first, session.last)
    first, second = turns["fp32"]
    history = first.prompt_token_ids + first.output_token_ids[:-1] + second.prompt_token_ids
    ref_embeds = reference_ldpnet.image_embeds(reference_ldpnet.pixels(image))
    _, ref_logits = reference_ldpnet.greedy(reference_ldpnet.input_embeds(history, ref_embeds), 1)
    assert rel_err(second.first_logits, ref_logits) < REL_TOL
    first8, second8 = turns["int8"]
    assert rel_err(first8.first_logits, first.first_logits) < REL_TOL  # the prompt's own chunk: no page read
    assert first8.output_token_ids == first.output_token_ids  # the same history: comparable turn-2 logits
    assert REL_TOL < rel_err(second8.first_logits, ref_logits) < INT8_KV_TOL


def test_decode_over_8_bit_pages_stays_near_fp32(int8_engine, ldpnet_engine):
    """The same tokens fed to both libraries: every step's logits within the 8-bit error."""
    prompt = int8_engine.tokenizer.encode("Tell me a long story about a red house by the sea.")
    tokens = [5, 17, 42, 99, 7, 300, 12, 8, 64, 23, 11, 250]
    logits = {}
    for name, engine in (("int8", int8_engine), ("fp32", ldpnet_engine)):
        seq = engine.add_sequence()
        try:
            engine.prefill([seq], [engine.prompt(prompt, [])])
            logits[name] = [engine.decode([seq], [t]).numpy().reshape(-1) for t in tokens]
        finally:
            engine.remove_sequence(seq)
    errors = [rel_err(a, b) for a, b in zip(logits["int8"], logits["fp32"])]
    assert max(errors) < INT8_KV_TOL and min(errors) > REL_TOL, errors


def test_a_fork_inside_a_page_reads_what_its_parent_does(int8_engine):
    """A child forked at a position inside a page gets a copy of that page (`copy_single_page`): its next
    step's logits equal the parent's for the same token, exactly (the same 8-bit rows and scales)."""
    prompt = int8_engine.tokenizer.encode("A fork inside a page: twenty-one tokens or so of prompt here.")
    assert len(prompt) % 16 and len(prompt) > 16
    parent = int8_engine.add_sequence()
    try:
        int8_engine.prefill([parent], [int8_engine.prompt(prompt, [])])
        child = int8_engine.fork_sequence(parent, len(prompt))
        try:
            ours = int8_engine.decode([child], [9]).numpy().reshape(-1)
        finally:
            int8_engine.remove_sequence(child)
        theirs = int8_engine.decode([parent], [9]).numpy().reshape(-1)
    finally:
        int8_engine.remove_sequence(parent)
    np.testing.assert_array_equal(ours, theirs)


def test_every_page_kernel_of_the_exported_model_is_swapped(ldpnet_built):
    """On the real export: append, page copy, compaction and the debug read become 8-bit kernels; tree
    attention over pages fails naming the flag; a module lacking one of them is refused."""
    import tvm

    from mobilevlm_mlc.compiler import export_model
    from mobilevlm_mlc.formats.dist import load_dist
    from mobilevlm_mlc.model_defs.mobilevlm import MobileVLMForCausalLM
    from mobilevlm_mlc.targets import get_target
    from mobilevlm_mlc.targets.cpu_kernels import int8_kv

    model = MobileVLMForCausalLM(load_dist(ldpnet_built.dist).config, None, "float64")
    mod, _ = export_model(model, get_target("cpu").tvm_target())
    kernels = (int8_kv.APPEND, int8_kv.COPY_PAGE, int8_kv.COMPACT, int8_kv.DEBUG_GET)
    before = {name: mod[name].script() for name in kernels}
    swapped = int8_kv.replace_page_kernels(mod)
    for name in kernels:
        assert swapped[name].script() != before[name], name
        # the value kernels read or write through an int8 view; the page copy copies whole pages
        assert ('"int8"' in swapped[name].script()) == (name != int8_kv.COPY_PAGE) and '"int8"' not in before[name]
    tree = swapped[
        next(
            gv
            for gv, f in swapped.functions_items()
            if f.attrs and f.attrs.get("global_symbol") == int8_kv.PAGED_TREE_ATTENTION
        )
    ]
    assert "not supported by a library built with an 8-bit KV cache (--kv-cache int8)" in tree.script()
    with pytest.raises(ValueError, match="no page kernel named compact_kv_copy_cpu, tir_kv_cache_debug_get_kv, tir_kv"):
        int8_kv.replace_page_kernels(tvm.IRModule({int8_kv.COPY_PAGE: swapped[int8_kv.COPY_PAGE]}))
