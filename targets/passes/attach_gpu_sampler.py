"""`attach_gpu_sampler`: the sampler functions MLC's engine calls on a CUDA, Vulkan or Metal device
(`cpp/serve/sampler/gpu_sampler.cc`; on any other device, OpenCL on Android included, it samples on the
host from `softmax_with_temperature`'s probabilities, so nothing is attached there).

All take f32 probabilities [batch, vocab] (one row per sequence) and the engine's host-made inputs
(`uniform_samples` f32[n] drawn by each request's RNG, `sample_indices` int32[n] naming the row each
of the n samples draws from):

- `multinomial_from_uniform(probs, uniform_samples, sample_indices) -> int32[n]`: the first token whose
  cumulative probability exceeds the uniform sample (no top-p).
- `argsort_probs(probs) -> (sorted_probs, sorted_indices int32)`: each row in descending order.
- `sample_with_top_p(sorted_probs, sorted_indices, uniform_samples, sample_indices, top_p f32[batch])
  -> int32[n]`: the same draw within each row's nucleus.
- `sampler_take_probs(probs, sorted_indices, sample_indices, sampled int32[n], top_prob_offsets
  int32[m]) -> (f32[n], f32[m], int32[m])`: the sampled tokens' probabilities, and the probabilities and
  tokens at flat offsets `row * vocab + rank` of the sorted order (the engine's top-logprobs).
- `renormalize_by_top_p(probs, top_p f32[batch], init_pivots f32[batch, 3]) -> probs`: each row with
  every probability below its nucleus' smallest set to zero and the rest renormalized (ties with the
  cutoff kept). MLC searches for the cutoff from the three pivots the engine guesses; here each row is
  sorted once and the cutoff read from its cumulative sum, which gives the same set: the pivots are
  taken, as the engine passes them, and not needed.

`sampler_verify_draft_tokens` (speculative decoding, which needs a draft model this project does not
build) is not attached: the engine looks it up as optional.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn

from mobilevlm_mlc.formats.mlc_contract import GPU_SAMPLER_DEVICES

TOP_P_PIVOTS = 3  # init_pivots per row, as gpu_sampler.cc fills them


def attach_gpu_sampler(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` with the sampler functions where MLC's engine samples on the device, else unchanged."""
    if target.kind.name not in GPU_SAMPLER_DEVICES:
        return mod
    return add_sampler_functions(mod)


# each argument the engine passes: its shape (in the symbolic sizes below) and dtype
_ARGUMENTS = {
    "probs": (("batch_size", "vocab_size"), "float32"),
    "sorted_probs": (("batch_size", "vocab_size"), "float32"),
    "sorted_indices": (("batch_size", "vocab_size"), "int32"),
    "uniform_samples": (("num_samples",), "float32"),
    "sample_indices": (("num_samples",), "int32"),
    "sampled": (("num_samples",), "int32"),
    "top_p": (("batch_size",), "float32"),
    "top_prob_offsets": (("num_positions",), "int32"),
    "init_pivots": (("batch_size", TOP_P_PIVOTS), "float32"),
}


def _arguments(*names: str) -> list[relax.Var]:
    """Fresh parameters for one function (Relax wants every function's variables its own)."""
    sizes = {n: tirx.Var(n, "int64") for n in ("batch_size", "num_samples", "num_positions", "vocab_size")}
    return [
        relax.Var(name, relax.TensorType([sizes.get(d, d) for d in _ARGUMENTS[name][0]], _ARGUMENTS[name][1]))
        for name in names
    ]


def add_sampler_functions(mod: tvm.IRModule) -> tvm.IRModule:
    """The five functions, for any target (tests build them for the CPU to run them here)."""
    bb = relax.BlockBuilder(mod)
    probs, uniform, rows = args = _arguments("probs", "uniform_samples", "sample_indices")
    with bb.function("multinomial_from_uniform", args):
        with bb.dataflow():
            drawn = nn.multinomial_from_uniform(_wrap(probs), _column(uniform), _column(rows), dtype="int32")
            output = bb.emit_output(nn.reshape(drawn, [rows.ty.shape[0]])._expr)
        bb.emit_func_output(output)

    [probs] = args = _arguments("probs")
    with bb.function("argsort_probs", args):
        with bb.dataflow():
            order = bb.emit(relax.op.argsort(probs, axis=-1, descending=True, dtype="int32"))
            values = bb.emit_te(_take_rows, probs, order, primfunc_name_hint="take_sorted_probs")
            output = bb.emit_output(relax.Tuple([values, order]))
        bb.emit_func_output(output)

    ranked, order, uniform, rows, top_p = args = _arguments(
        "sorted_probs", "sorted_indices", "uniform_samples", "sample_indices", "top_p"
    )
    with bb.function("sample_with_top_p", args):
        with bb.dataflow():
            sorted_rows = _wrap(ranked)
            drawn = nn.sample_top_p_top_k_from_sorted_prob(
                sorted_rows,
                _wrap(order),
                _column(top_p),
                _whole_vocabulary(sorted_rows),
                _column(uniform),
                _column(rows),
            )
            output = bb.emit_output(nn.reshape(drawn, [rows.ty.shape[0]])._expr)
        bb.emit_func_output(output)

    args = _arguments("probs", "sorted_indices", "sample_indices", "sampled", "top_prob_offsets")
    with bb.function("sampler_take_probs", args):
        with bb.dataflow():
            output = bb.emit_output(bb.emit_te(_take_probs, *args, primfunc_name_hint="sampler_take_probs"))
        bb.emit_func_output(output)

    probs, top_p, _ = args = _arguments("probs", "top_p", "init_pivots")
    with bb.function("renormalize_by_top_p", args):
        with bb.dataflow():
            descending = bb.emit(relax.op.sort(probs, axis=-1, descending=True))
            running = bb.emit(relax.op.cumsum(descending, axis=-1))
            kept = bb.emit_te(
                _keep_nucleus, probs, descending, running, top_p, primfunc_name_hint="renormalize_by_top_p"
            )
            output = bb.emit_output(kept)
        bb.emit_func_output(output)
    return bb.finalize()


def _wrap(var: relax.Var) -> nn.Tensor:
    return nn.wrap_nested(var, name=var.name)


def _column(var: relax.Var) -> nn.Tensor:
    """[n] -> [n, 1], the shape TVM's sampling operators take."""
    return nn.reshape(_wrap(var), [var.ty.shape[0], 1])


def _whole_vocabulary(probs: nn.Tensor) -> nn.Tensor:
    """top_k = vocab for every row of `probs`: MLC's engine applies top-k on the host, top-p here."""
    return nn.tensor_expr_op(
        lambda p: te.compute((p.shape[0], 1), lambda i, _: p.shape[1].astype("int32"), name="whole_vocabulary"),
        "whole_vocabulary",
        args=[probs],
    )


def _take_rows(probs: te.Tensor, order: te.Tensor) -> te.Tensor:
    return te.compute(probs.shape, lambda i, j: probs[i, order[i, j]], name="take_sorted_probs")


def _keep_nucleus(probs: te.Tensor, descending: te.Tensor, running: te.Tensor, top_p: te.Tensor) -> te.Tensor:
    """Zero below each row's cutoff, the rest renormalized. The cutoff is the sorted value at the first
    rank whose running sum reaches top_p (TVM's `renormalize_top_p_top_k_prob` computes the same set
    but compares a bool with 0, which LLVM refuses)."""
    batch, vocab = probs.shape
    k = te.reduce_axis((0, vocab), "k")
    one, zero = tirx.const(1, "int64"), tirx.const(0, "int64")
    below = te.compute(
        (batch,), lambda i: te.sum(tirx.Select(running[i, k] < top_p[i], one, zero), axis=k), name="below"
    )
    cutoff = te.compute((batch,), lambda i: descending[i, tirx.min(below[i], vocab - 1)], name="cutoff")
    kept = te.compute(probs.shape, lambda i, j: tirx.Select(probs[i, j] >= cutoff[i], probs[i, j], 0.0), name="kept")
    k2 = te.reduce_axis((0, vocab), "k2")
    total = te.compute((batch,), lambda i: te.sum(kept[i, k2], axis=k2), name="total")
    return te.compute(probs.shape, lambda i, j: kept[i, j] / total[i], name="renormalized")


def _take_probs(
    probs: te.Tensor, order: te.Tensor, rows: te.Tensor, sampled: te.Tensor, offsets: te.Tensor
) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    vocab = probs.shape[1]

    def ranked(i: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
        offset = offsets[i].astype("int64")  # shapes are int64
        return tirx.floordiv(offset, vocab), tirx.floormod(offset, vocab)

    sampled_probs = te.compute(sampled.shape, lambda j: probs[rows[j], sampled[j]], name="sampled_probs")
    top_tokens = te.compute(offsets.shape, lambda i: order[ranked(i)], name="top_prob_indices")
    top_probs = te.compute(offsets.shape, lambda i: probs[ranked(i)[0], top_tokens[i]], name="top_prob_probs")
    return sampled_probs, top_probs, top_tokens
