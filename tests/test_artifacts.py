"""Exact contents of what convert and compile write: MLC's tensor cache and chat config, `_metadata`."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from mobilevlm_mlc.conversation import V1_TEMPLATE
from mobilevlm_mlc.convert import model_param_shapes
from mobilevlm_mlc.dist import load_dist


def test_tensor_cache_schema(ldpnet_built):
    dist = ldpnet_built.dist
    cache = json.loads((dist / "tensor-cache.json").read_text())
    config = load_dist(dist).config
    shapes = model_param_shapes(config)
    records = [r for shard in cache["records"] for r in shard["records"]]
    assert sorted(r["name"] for r in records) == sorted(shapes)  # large tensors get shards of their own
    assert cache["metadata"]["ParamSize"] == len(shapes)
    assert cache["metadata"]["ParamBytes"] == sum(int(np.prod(s)) for s in shapes.values()) * 4
    assert cache["metadata"]["BitsPerParam"] == 32.0
    for shard in cache["records"]:
        data = (dist / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard"
        assert shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        for r in shard["records"]:
            assert r["format"] == "raw" and r["dtype"] == "float32"
            assert r["shape"] == list(shapes[r["name"]])
            assert r["nbytes"] == int(np.prod(r["shape"])) * 4
            assert r["byteOffset"] + r["nbytes"] <= len(data)
    assert len(cache["records"]) > 1 and all(s["nbytes"] <= 33 * 2**20 for s in cache["records"])


def test_chat_config(ldpnet_built):
    chat = json.loads((ldpnet_built.dist / "mlc-chat-config.json").read_text())
    assert chat["version"] == "0.1.0"
    assert chat["model_type"] == "mobilevlm" and chat["quantization"] == "q0f32"
    assert chat["conv_template"] == V1_TEMPLATE
    assert chat["conv_template"]["system_message"].startswith("A chat between a curious user")
    assert (chat["vocab_size"], chat["context_window_size"], chat["prefill_chunk_size"]) == (32000, 2048, 2048)
    assert (chat["bos_token_id"], chat["eos_token_id"], chat["pad_token_id"]) == (1, 2, 0)
    assert chat["model_config"]["projector_type"] == "ldpnet"
    assert chat["model_config"]["text"]["num_hidden_layers"] == 4
    assert chat["tokenizer_files"] == ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    for name in chat["tokenizer_files"]:
        assert (ldpnet_built.dist / name).read_bytes() == (ldpnet_built.checkpoint / name).read_bytes()
    for key in ("sliding_window_size", "attention_sink_size", "tensor_parallel_shards", "pipeline_parallel_stages",
                "temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "tokenizer_info", "model_task"):
        assert key in chat


def test_library_metadata_and_functions(ldpnet_engine):
    meta = ldpnet_engine.metadata
    shapes = model_param_shapes(ldpnet_engine.dist.config)
    assert [p["name"] for p in meta["params"]] == list(shapes)
    assert all(p["shape"] == list(shapes[p["name"]]) and p["dtype"] == "float32" for p in meta["params"])
    assert (meta["model_type"], meta["quantization"], meta["num_image_tokens"]) == ("mobilevlm", "q0f32", 144)
    for name in ("embed", "image_embed", "vision_features", "prefill", "decode", "create_tir_paged_kv_cache", "_metadata"):
        assert ldpnet_engine.vm.module.implements_function(name), name
