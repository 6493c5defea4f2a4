"""`attach_sampling_functions`: the Relax functions MLC's engine calls around every forward step:

- `softmax_with_temperature(logits f32[b, 1, v], temperature f32[b]) -> f32[b, 1, v]`: each row's
  softmax of logits / temperature; a temperature at or below 1e-5 means greedy, the probability spread
  evenly over the row's maxima (`cpp/serve/logit_processor.cc` passes max(temperature, 0)). A row with
  a non-finite logit is all NaN, so a broken model is refused by the sampler, never drawn from (the max
  of a row skips NaN: greedy would otherwise pick a token from it).
- `alloc_embedding_tensor() -> [prefill_chunk_size, hidden]` in the embeddings' dtype: the buffer the
  engine assembles each prompt in (text and image parts at running offsets); its shape tells the engine
  the hidden size.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

GREEDY_TEMPERATURE = 1e-5  # at or below: greedy (MLC's threshold)


def _softmax_with_temperature(logits: te.Tensor, temperature: te.Tensor) -> te.Tensor:
    b, _, v = logits.shape
    k = te.reduce_axis((0, v), "k")
    row_max = te.compute((b,), lambda i: te.max(logits[i, 0, k], axis=k), name="row_max")

    def weight(i, j):
        greedy = temperature[i] <= tirx.const(GREEDY_TEMPERATURE, "float32")
        is_max = tirx.Select(logits[i, 0, j] == row_max[i], tirx.const(1, "float32"), tirx.const(0, "float32"))
        scaled = tirx.exp(
            (logits[i, 0, j] - row_max[i]) / tirx.max(temperature[i], tirx.const(GREEDY_TEMPERATURE, "float32"))
        )
        return tirx.Select(greedy, is_max, scaled)

    weights = te.compute((b, v), weight, name="weights")
    k2 = te.reduce_axis((0, v), "k2")
    total = te.compute((b,), lambda i: te.sum(weights[i, k2], axis=k2), name="total")
    k3 = te.reduce_axis((0, v), "k3")
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
    broken = te.compute(
        (b,), lambda i: te.sum(tirx.Select(tirx.isfinite(logits[i, 0, k3]), zero, one), axis=k3), name="non_finite"
    )
    nan = tirx.const(float("nan"), "float32")
    return te.compute(
        (b, 1, v), lambda i, _, j: tirx.Select(broken[i] > 0, nan, weights[i, j] / total[i]), name="probs"
    )


def attach_sampling_functions(mod: tvm.IRModule, prefill_chunk_size: int, hidden_size: int, dtype: str) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    batch, vocab = tirx.Var("batch_size", "int64"), tirx.Var("vocab_size", "int64")
    logits = relax.Var("logits", relax.TensorType((batch, 1, vocab), "float32"))
    temperature = relax.Var("temperature", relax.TensorType((batch,), "float32"))
    with bb.function("softmax_with_temperature", [logits, temperature]):
        with bb.dataflow():
            probs = bb.emit_output(
                bb.emit_te(
                    _softmax_with_temperature, logits, temperature, primfunc_name_hint="softmax_with_temperature"
                )
            )
        bb.emit_func_output(probs)
    with bb.function("alloc_embedding_tensor", []):
        buffer = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([prefill_chunk_size, hidden_size]), dtype, 0))
        bb.emit_func_output(buffer)
    return bb.finalize()
