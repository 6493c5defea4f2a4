"""`attach_logit_processor`: the three in-place logit processors MLC's engine requires of every library
(`cpp/serve/logit_processor.cc` ICHECKs them when it builds its LogitProcessor), as TIR functions with
the float32 logits and int32 buffers and dims it passes:

- `apply_logit_bias_inplace(logits[B, V], pos2seq_id[T], token_ids[T], logit_bias[T])`:
  logits[pos2seq_id[t], token_ids[t]] += logit_bias[t]
- `apply_penalty_inplace(logits[B, V], seq_ids[S], pos2seq_id[T], token_ids[T], token_cnt[T], penalties[S, 3])`:
  with k = pos2seq_id[t], row seq_ids[k] and penalties[k] = (presence, frequency, repetition):
  x -= presence + token_cnt[t] * frequency, then x *= repetition if x < 0 else x /= repetition
- `apply_bitmask_inplace(logits[B, V], seq_ids[S], bitmask[B, ceil(V / 32)])`: in each listed row, a
  token whose bit is clear gets float32's lowest value (bit v % 32 of word v // 32 set = allowed)

Each body is written once (a macro); a CPU runs it in a serial loop (a few thousand updates per step),
a GPU one update per thread.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

THREADS = 256  # per GPU block


# fmt: off
@T.macro
def _bias(logits, pos2seq_id, token_ids, logit_bias, i):
    logits[pos2seq_id[i], token_ids[i]] = logits[pos2seq_id[i], token_ids[i]] + logit_bias[i]


@T.macro
def _penalty(logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties, i):
    k = pos2seq_id[i]
    x: T.let[T.float32] = logits[seq_ids[k], token_ids[i]] - (penalties[k, 0] + T.Cast("float32", token_cnt[i]) * penalties[k, 1])
    logits[seq_ids[k], token_ids[i]] = T.if_then_else(x < T.float32(0), x * penalties[k, 2], x / penalties[k, 2])


@T.macro
def _mask(logits, seq_ids, bitmask, vocab_size, i):
    row, v = seq_ids[i // vocab_size], i % vocab_size
    if (bitmask[row, v // 32] >> (v % 32)) & 1 == 0:
        logits[row, v] = T.min_value("float32")


def _logit_bias(gpu: bool) -> tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def apply_logit_bias_inplace(var_logits: T.handle, var_pos2seq_id: T.handle, var_token_ids: T.handle, var_logit_bias: T.handle):
        T.func_attr({"global_symbol": "apply_logit_bias_inplace", "tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_token = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        logit_bias = T.match_buffer(var_logit_bias, (num_token,), "float32")
        if gpu:
            for bx in T.thread_binding(T.ceildiv(num_token, THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("update"):
                        T.reads()
                        T.writes()
                        if bx * THREADS + tx < num_token:
                            _bias(logits, pos2seq_id, token_ids, logit_bias, bx * THREADS + tx)
        else:
            for i in T.serial(num_token):
                with T.sblock("update"):
                    T.reads()
                    T.writes()
                    _bias(logits, pos2seq_id, token_ids, logit_bias, i)

    return apply_logit_bias_inplace


def _penalties(gpu: bool) -> tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def apply_penalty_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_pos2seq_id: T.handle, var_token_ids: T.handle,
                              var_token_cnt: T.handle, var_penalties: T.handle):
        T.func_attr({"global_symbol": "apply_penalty_inplace", "tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_token, num_seq = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        token_cnt = T.match_buffer(var_token_cnt, (num_token,), "int32")
        penalties = T.match_buffer(var_penalties, (num_seq, 3), "float32")
        if gpu:
            for bx in T.thread_binding(T.ceildiv(num_token, THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("update"):
                        T.reads()
                        T.writes()
                        if bx * THREADS + tx < num_token:
                            _penalty(logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties, bx * THREADS + tx)
        else:
            for i in T.serial(num_token):
                with T.sblock("update"):
                    T.reads()
                    T.writes()
                    _penalty(logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties, i)

    return apply_penalty_inplace


def _bitmask(gpu: bool) -> tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def apply_bitmask_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
        T.func_attr({"global_symbol": "apply_bitmask_inplace", "tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_seq = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        bitmask = T.match_buffer(var_bitmask, (batch_size, (vocab_size + 31) // 32), "int32")
        if gpu:
            for bx in T.thread_binding(T.ceildiv(num_seq * vocab_size, THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("update"):
                        T.reads()
                        T.writes()
                        if bx * THREADS + tx < num_seq * vocab_size:
                            _mask(logits, seq_ids, bitmask, vocab_size, bx * THREADS + tx)
        else:
            for i in T.serial(num_seq * vocab_size):
                with T.sblock("update"):
                    T.reads()
                    T.writes()
                    _mask(logits, seq_ids, bitmask, vocab_size, i)

    return apply_bitmask_inplace
# fmt: on


def attach_logit_processor(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` with the three processors, for `target`'s kind (CPU loops, or one update per GPU thread)."""
    gpu = target.kind.name != "llvm"
    functions = dict(mod.functions_items())
    for make in (_logit_bias, _penalties, _bitmask):
        func = make(gpu)
        functions[tvm.ir.GlobalVar(func.attrs["global_symbol"])] = func
    return tvm.IRModule(functions, attrs=mod.attrs)
