"""A built library driven as MLC-LLM's engine drives it (`cpp/serve/model.cc`, `logit_processor.cc`):
its function names, argument order, dtypes and shapes, `begin_forward` / `end_forward` around each call;
batched logits equal single-sequence logits; each logit processor against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from mobilevlm_mlc.formats.library import inspect_library
from mobilevlm_mlc.formats.mlc_contract import GPU_SAMPLER_FUNCTIONS, METADATA_KEYS, TIR_FUNCTIONS, VM_FUNCTIONS
from mobilevlm_mlc.formats.mlc_runtime import REGISTERED_IN

from .helpers import DEMO_IMAGE, REL_TOL, reference_for, rel_err


def test_library_reports_the_contract(ldpnet_built):
    report = inspect_library(ldpnet_built.lib)
    for name, arity in VM_FUNCTIONS.items():
        assert report.vm_functions[name] == arity, name
    assert report.vm_functions["image_embed"] == 6  # bytes, four sizes, params
    assert set(TIR_FUNCTIONS) <= report.host_functions
    assert set(METADATA_KEYS) <= set(report.metadata)
    assert report.contract_problems == []
    assert not set(GPU_SAMPLER_FUNCTIONS) & set(report.vm_functions)  # on a CPU MLC samples on the host
    assert "vm.builtin.paged_attention_kv_cache_create" in report.runtime_functions
    # all of them registered by the TVM runtime sources mlc4j compiles, with arities it accepts
    assert report.runtime_calls["vm.builtin.paged_attention_kv_cache_create"] == {28}
    assert report.vm_header == (0xD225DE2F4214151E, "0.14") and report.runtime_problems == []
    meta = report.metadata
    assert meta["kv_cache"] == {
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
    }
    assert meta["max_batch_size"] == 128 and meta["sliding_window_size"] == -1 and meta["tensor_parallel_shards"] == 1
    assert all(p["preprocs"] == [] for p in meta["params"])
    # TVM's static memory plan per function, prompts of up to one prefill chunk, up to 128 sequences
    usage = meta["memory_usage"]
    assert set(VM_FUNCTIONS) <= set(usage) and all(isinstance(v, int) and v >= 0 for v in usage.values())
    assert usage["prefill"] > usage["decode"] > 0 and usage["batch_decode"] > usage["decode"]
    assert usage["alloc_embedding_tensor"] == meta["prefill_chunk_size"] * meta["hidden_size"] * 4  # fp32 model


def _forward(engine, name: str, seq_ids: list[int], lengths: list[int], *args):
    """One forward call between begin_forward and end_forward, as MLC's engine brackets it."""
    engine.kv.backend.builtin("kv_state_begin_forward")(
        engine.kv.handle, tvm.runtime.ShapeTuple(seq_ids), tvm.runtime.ShapeTuple(lengths)
    )
    result = engine.vm[name](*args, engine.kv.handle, engine.params)
    engine.kv.end_forward()
    return result[0].numpy()


def test_batch_prefill_and_decode_equal_single_sequences(ldpnet_engine):
    engine = ldpnet_engine
    hidden = engine.hidden_size
    buffer = engine.vm["alloc_embedding_tensor"]()
    assert tuple(buffer.shape) == (engine.prefill_chunk_size, hidden) and buffer.dtype == "float32"
    prompts = [[1, 319, 29871, 450, 1205], [1, 910, 338], [1, 22172, 3186, 29991]]
    embeds = [engine.embed(ids).numpy() for ids in prompts]
    # single sequences: prefill, then two decode steps each
    single, seqs = [], []
    for e in embeds:
        seq = engine.add_sequence()
        seqs.append(seq)
        logits = [_forward(engine, "prefill", [seq], [len(e)], tvm.runtime.tensor(e[None]))[0, -1]]
        for token in (42, 7):
            step = tvm.runtime.tensor(engine.embed([token]).numpy()[None])
            logits.append(_forward(engine, "decode", [seq], [1], step)[0, -1])
        single.append(logits)
    for seq in seqs:
        engine.remove_sequence(seq)
    # the same three sequences batched, their prompts at running offsets of one buffer
    seqs = [engine.add_sequence() for _ in prompts]
    lengths = [len(e) for e in embeds]
    packed = np.concatenate(embeds)[None]
    positions = tvm.runtime.tensor(np.cumsum(lengths).astype("int32") - 1)
    batched = [_forward(engine, "batch_prefill", seqs, lengths, tvm.runtime.tensor(packed), positions)[0]]
    for token in (42, 7):
        step = tvm.runtime.tensor(np.stack([engine.embed([token]).numpy()] * len(seqs)))  # [b, 1, hidden]
        batched.append(_forward(engine, "batch_decode", seqs, [1] * len(seqs), step)[:, 0])
    for seq in seqs:
        engine.remove_sequence(seq)
    assert batched[0].shape == (3, engine.metadata["vocab_size"])
    for step in range(3):
        for i in range(len(prompts)):
            assert rel_err(batched[step][i], single[i][step]) < 1e-4, (step, i)


@pytest.mark.parametrize("size", [(336, 336), (480, 320)])
def test_image_embed_called_as_mlc_calls_it(ldpnet_engine, workspace, size):
    """`image_embed(bytes uint8 [1, H, W, 3], Shape resize_h, resize_w, crop_h, crop_w, params)`: MLC's
    Android app sends 336 x 336 (resized in Kotlin), other clients any size; the four sizes are (0)
    for every model but Phi-3-V. Matches the reference's projector output on the reference's pixels."""
    from PIL import Image

    image = Image.open(DEMO_IMAGE).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    rgb = np.asarray(image, np.uint8)[None]
    zero = tvm.runtime.ShapeTuple([0])
    embeds = ldpnet_engine.vm["image_embed"](tvm.runtime.tensor(rgb), zero, zero, zero, zero, ldpnet_engine.params)
    reference = reference_for(workspace, "ldpnet")
    expected = reference.image_embeds(reference.pixels(image)).numpy()
    assert tuple(embeds.shape) == expected.shape == (144, 256) and embeds.dtype == "float32"
    assert rel_err(embeds.numpy(), expected) < REL_TOL


def test_engine_batched_calls_equal_single_ones(ldpnet_engine):
    """The driver's prefill of several prompts (packed into `batch_prefill` calls, a prompt split across
    calls where the chunk is full) and its `batch_decode` give each sequence its own logits."""
    engine = ldpnet_engine
    prompts = [[1, 319, 29871], [1, 910, 338, 263, 1243], [1, 22172]]
    seqs = [engine.add_sequence() for _ in prompts]
    try:
        first = [row.numpy()[0, -1] for row in engine.prefill(seqs, [engine.prompt(ids, []) for ids in prompts])]
        batched = engine.decode(seqs, [42, 7, 99]).numpy()[:, 0]
    finally:
        for seq in seqs:
            engine.remove_sequence(seq)
    for i, ids in enumerate(prompts):
        seq = engine.add_sequence()
        try:
            [alone] = engine.prefill([seq], [engine.prompt(ids, [])])
            assert rel_err(first[i], alone.numpy()[0, -1]) < 1e-4, i
            assert rel_err(batched[i], engine.decode([seq], [[42, 7, 99][i]]).numpy()[0, -1]) < 1e-4, i
        finally:
            engine.remove_sequence(seq)


def _probs_reference(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float64)
    if temperature <= 1e-5:
        top = (x == x.max()).astype(np.float64)
        return top / top.sum()
    e = np.exp((x - x.max()) / temperature)
    return e / e.sum()


def test_softmax_with_temperature(ldpnet_engine):
    vocab = ldpnet_engine.metadata["vocab_size"]
    logits = np.random.default_rng(0).standard_normal((4, 1, vocab)).astype("float32") * 4
    logits[3, 0, [5, 9]] = 50  # a tie for the greedy row
    temperature = np.array([1.0, 0.7, 2.5, 0.0], "float32")
    probs = ldpnet_engine.vm["softmax_with_temperature"](
        tvm.runtime.tensor(logits), tvm.runtime.tensor(temperature)
    ).numpy()
    for i, t in enumerate(temperature):
        # rtol: the CPU build's exp is TOPI's fast polynomial (FastMathTransform), 4e-5 relative at worst
        np.testing.assert_allclose(probs[i, 0], _probs_reference(logits[i, 0], t), rtol=1e-4, atol=1e-9)
    assert probs[3, 0, 5] == probs[3, 0, 9] == 0.5
    logits[1, 0, 7], logits[2, 0, 3] = np.nan, np.inf  # a broken row is all NaN, the others untouched
    broken = ldpnet_engine.vm["softmax_with_temperature"](tvm.runtime.tensor(logits), tvm.runtime.tensor(temperature))
    broken = broken.numpy()
    assert np.isnan(broken[1:3]).all() and np.array_equal(broken[[0, 3]], probs[[0, 3]])


@pytest.fixture
def logits():
    return np.random.default_rng(1).standard_normal((3, 100)).astype("float32")


def _processor(engine, name: str):
    """A TIR function of the library, looked up as MLC's engine does (`GetFunction(name, query_imports=true)`)."""
    return engine.vm.module.get_function(name, query_imports=True)


def test_logit_bias(ldpnet_engine, logits):
    pos2seq, tokens, bias = (
        np.array([0, 2, 2], "int32"),
        np.array([5, 1, 99], "int32"),
        np.array([1.5, -2, 3], "float32"),
    )
    out = tvm.runtime.tensor(logits)
    _processor(ldpnet_engine, "apply_logit_bias_inplace")(out, *map(tvm.runtime.tensor, (pos2seq, tokens, bias)))
    expected = logits.copy()
    expected[pos2seq, tokens] += bias
    np.testing.assert_array_equal(out.numpy(), expected)


def test_penalties(ldpnet_engine, logits):
    seq_ids = np.array([2, 0], "int32")  # logits row of each sequence
    pos2seq = np.array([0, 0, 1], "int32")
    tokens, counts = np.array([3, 7, 3], "int32"), np.array([1, 4, 2], "int32")
    penalties = np.array([[0.5, 0.25, 1.3], [0.0, 1.0, 0.8]], "float32")  # presence, frequency, repetition
    out = tvm.runtime.tensor(logits)
    _processor(ldpnet_engine, "apply_penalty_inplace")(
        out, *map(tvm.runtime.tensor, (seq_ids, pos2seq, tokens, counts, penalties))
    )
    expected = logits.copy()
    for k, token, count in zip(pos2seq, tokens, counts):
        presence, frequency, repetition = penalties[k]
        x = expected[seq_ids[k], token] - (presence + count * frequency)
        expected[seq_ids[k], token] = x * repetition if x < 0 else x / repetition
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_bitmask(ldpnet_engine, logits):
    seq_ids = np.array([0, 2], "int32")
    bitmask = np.random.default_rng(2).integers(0, 2**32, (3, 4), dtype=np.uint64).astype(np.uint32).view(np.int32)
    out = tvm.runtime.tensor(logits)
    _processor(ldpnet_engine, "apply_bitmask_inplace")(out, *map(tvm.runtime.tensor, (seq_ids, bitmask)))
    expected = logits.copy()
    allowed = (bitmask.view(np.uint32)[:, np.arange(100) // 32] >> (np.arange(100) % 32)) & 1
    for row in seq_ids:
        expected[row, allowed[row] == 0] = np.finfo(np.float32).min
    np.testing.assert_array_equal(out.numpy(), expected)


def test_runtime_check_names_what_mlc4j_lacks():
    """`mlc_runtime.runtime_problems` on calls a library could make: a contrib function mlc4j does not
    compile, a KV cache constructor of another TVM, an unknown function, another VM format."""
    from mobilevlm_mlc.formats.mlc_runtime import runtime_problems

    header = (0xD225DE2F4214151E, "0.14")
    assert runtime_problems({"vm.builtin.reshape": {2}}, header) == []
    REGISTERED_IN["tvm.contrib.sort.argsort"] = "runtime/contrib/sort/sort.cc"
    try:
        assert runtime_problems({"tvm.contrib.sort.argsort": {4}}, header) == [
            "'tvm.contrib.sort.argsort' is registered in TVM's runtime/contrib/sort/sort.cc, which mlc4j's runtime does not compile"
        ]
    finally:
        del REGISTERED_IN["tvm.contrib.sort.argsort"]
    assert runtime_problems({"vm.builtin.paged_attention_kv_cache_create": {27}}, header) == [
        "'vm.builtin.paged_attention_kv_cache_create' is called with [27] arguments, the runtime takes [28, 29]"
    ]
    assert runtime_problems({"my.func": {1}}, header) == [
        "'my.func' is not among the functions checked against mlc4j's runtime"
    ]
    assert runtime_problems({}, (0xD225DE2F4214151E, "0.13")) == [
        "VM bytecode 0xd225de2f4214151e version '0.13', the runtime reads version '0.14'"
    ]
