"""MLC-LLM's model-library contract: what its C++ engine (`cpp/serve/`) looks up in a library and
reads from its `_metadata`, checked against mlc-llm at `MLC_LLM_COMMIT`. `check_contract` says what a
library lacks; `inspect` prints it.

Functions are Relax VM functions (called with their arguments as the engine passes them, the packed
parameters last) or TIR functions the engine calls directly (the logit processors).
"""

from __future__ import annotations

from typing import Any

MLC_LLM_COMMIT = "79d603f"

# VM function -> arguments as `cpp/serve/model.cc` passes them (params counted where packed)
VM_FUNCTIONS: dict[str, int] = {
    "_metadata": 0,
    "embed": 2,  # token ids int32[n], params
    "image_embed": 6,  # uint8 image [1, H, W, 3], resize h/w and crop h/w shapes, params
    "prefill": 3,  # embeddings [1, n, hidden], KV cache, params
    "decode": 3,  # embeddings [1, 1, hidden], KV cache, params
    "batch_prefill": 4,  # embeddings [1, total, hidden], logit positions int32[b], KV cache, params
    "batch_decode": 3,  # embeddings [b, 1, hidden], KV cache, params
    "create_tir_paged_kv_cache": 5,  # max sequences, max total length, prefill chunk, page size, sliding window
    "softmax_with_temperature": 2,  # logits f32[b, 1, vocab], temperature f32[b]
    "alloc_embedding_tensor": 0,
}
# devices the engine samples on (`Sampler::SupportGPUSampler`); elsewhere it samples on the host
GPU_SAMPLER_DEVICES = ("cuda", "vulkan", "metal")
# VM functions its GPU sampler calls there (the first four ICHECKed; renormalize_by_top_p at any top_p < 1)
GPU_SAMPLER_FUNCTIONS: dict[str, int] = {
    "multinomial_from_uniform": 3,  # probs f32[b, vocab], uniform samples f32[n], sample rows int32[n]
    "argsort_probs": 1,  # probs
    "sample_with_top_p": 5,  # sorted probs, sorted indices, uniform samples, sample rows, top_p f32[b]
    "sampler_take_probs": 5,  # probs, sorted indices, sample rows, sampled tokens, top-prob offsets
    "renormalize_by_top_p": 3,  # probs, top_p f32[b], initial pivots f32[b, 3]
}
# TIR functions the engine's logit processor calls (ICHECKed when the engine starts)
TIR_FUNCTIONS = ("apply_logit_bias_inplace", "apply_penalty_inplace", "apply_bitmask_inplace")
# `_metadata` keys `ModelMetadata::FromJSON` requires (or leaves uninitialized when absent)
METADATA_KEYS = (
    "model_type", "quantization", "context_window_size", "prefill_chunk_size", "max_batch_size",
    "sliding_window_size", "attention_sink_size", "tensor_parallel_shards", "pipeline_parallel_stages",
    "kv_cache", "params", "memory_usage",
)  # fmt: skip
KV_CACHE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
PARAM_KEYS = ("name", "dtype", "shape", "preprocs")


def check_contract(
    vm_functions: dict[str, int], symbols: set[str], metadata: dict[str, Any], devices: set[str]
) -> list[str]:
    """What a library lacks for MLC's engine, in words (empty: nothing). `vm_functions` maps its VM
    functions to their arity, `symbols` holds the names of its compiled TIR functions, `devices` the
    kinds of its device code ("cuda", "opencl", ...)."""
    problems = []
    required = VM_FUNCTIONS | (GPU_SAMPLER_FUNCTIONS if devices & set(GPU_SAMPLER_DEVICES) else {})
    for name, arity in required.items():
        if name not in vm_functions:
            problems.append(f"no function '{name}'")
        elif vm_functions[name] != arity:
            problems.append(f"'{name}' takes {vm_functions[name]} arguments, MLC's engine passes {arity}")
    problems += [f"no function '{name}'" for name in TIR_FUNCTIONS if name not in symbols]
    problems += [f"_metadata has no '{key}'" for key in METADATA_KEYS if key not in metadata]
    kv_cache = metadata.get("kv_cache")
    if isinstance(kv_cache, dict):
        problems += [f"_metadata.kv_cache has no '{key}'" for key in KV_CACHE_KEYS if key not in kv_cache]
    for param in metadata.get("params", [])[:1]:  # they are written alike: the first tells
        problems += [f"_metadata.params[] have no '{key}'" for key in PARAM_KEYS if key not in param]
    if metadata.get("tensor_parallel_shards", 1) != 1:
        problems.append("tensor_parallel_shards must be 1 (MLC's apps load system libraries unsharded)")
    return problems
