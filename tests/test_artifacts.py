"""Exact contents of what convert and compile write: MLC's tensor cache and chat config, `_metadata`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mobilevlm_mlc.convert.converter import model_param_shapes
from mobilevlm_mlc.fileio import TEMP_PREFIX
from mobilevlm_mlc.formats.dist import V1_TEMPLATE, load_dist


def test_tensor_cache_schema(ldpnet_built):
    dist = ldpnet_built.dist
    cache = json.loads((dist / "tensor-cache.json").read_text())
    config = load_dist(dist).config
    shapes = model_param_shapes(config)
    records = [r for shard in cache["records"] for r in shard["records"]]
    assert sorted(r["name"] for r in records) == sorted(shapes)  # large tensors get shards of their own
    assert cache["metadata"]["ParamSize"] == sum(
        int(np.prod(s)) for s in shapes.values()
    )  # MLC: parameters, not tensors
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
    for key in (
        "sliding_window_size",
        "attention_sink_size",
        "tensor_parallel_shards",
        "pipeline_parallel_stages",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "tokenizer_info",
        "model_task",
    ):
        assert key in chat


def test_library_metadata_and_functions(ldpnet_engine):
    meta = ldpnet_engine.metadata
    shapes = model_param_shapes(ldpnet_engine.dist.config)
    assert [p["name"] for p in meta["params"]] == list(shapes)
    assert all(p["shape"] == list(shapes[p["name"]]) and p["dtype"] == "float32" for p in meta["params"])
    assert (meta["model_type"], meta["quantization"], meta["num_image_tokens"]) == ("mobilevlm", "q0f32", 144)
    for name in (
        "embed",
        "image_embed",
        "vision_features",
        "prefill",
        "decode",
        "create_tir_paged_kv_cache",
        "_metadata",
    ):
        assert ldpnet_engine.vm.module.implements_function(name), name


# ---- loading: what the runtime trusts, and what it refuses --------------------------------------------


def _copy_dist(built, tmp_path):
    dist = tmp_path / "dist"
    shutil.copytree(built.dist, dist)
    return dist


def test_weights_load_with_tvm_readers(ldpnet_built):
    import tvm
    from tvm.contrib import tvmjs

    from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache

    ours = load_tensor_cache(ldpnet_built.dist, tvm.cpu())
    theirs, _ = tvmjs.load_tensor_cache(str(ldpnet_built.dist), tvm.cpu())
    native = tvm.get_global_func("vm.builtin.tensor_cache.load")
    native(str(ldpnet_built.dist), tvm.cpu().dlpack_device_type(), 0)
    get = tvm.get_global_func("vm.builtin.tensor_cache.get")
    assert ours.keys() == theirs.keys()
    for name in (
        "model.layers.0.self_attn.qkv_proj.weight",
        "vision_tower.embeddings.class_embedding",
        "mm_projector.blocks.1.se_fc1.weight",
    ):
        assert np.array_equal(ours[name].numpy(), theirs[name].numpy())
        assert np.array_equal(ours[name].numpy(), get(name).numpy())
    tvm.get_global_func("vm.builtin.tensor_cache.clear")()


def test_damaged_weights_are_refused(ldpnet_built, tmp_path):
    from mobilevlm_mlc.errors import MobileVLMError
    from mobilevlm_mlc.runtime.engine import Engine

    dist = _copy_dist(ldpnet_built, tmp_path)
    shard = dist / "params_shard_1.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-100])
    with pytest.raises(MobileVLMError, match=r"params_shard_1.bin: shard is \d+ bytes, tensor-cache.json says \d+"):
        Engine(dist, ldpnet_built.lib)
    shard.write_bytes(original[:50] + bytes([original[50] ^ 1]) + original[51:])
    with pytest.raises(MobileVLMError, match="params_shard_1.bin: md5 mismatch"):
        Engine(dist, ldpnet_built.lib)
    shard.write_bytes(original)

    cache_path = dist / "tensor-cache.json"
    cache = json.loads(cache_path.read_text())
    record = cache["records"][0]["records"][0]
    record["dtype"] = "float16"
    record["nbytes"] //= 2
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(
        MobileVLMError,
        match=f"weights do not match the library: {record['name']} is .* float16, library expects .* float32",
    ):
        Engine(dist, ldpnet_built.lib)
    record["dtype"] = "bfloat8"
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(MobileVLMError, match="has dtype 'bfloat8'"):
        Engine(dist, ldpnet_built.lib)
    del cache["records"][0]["records"][0]
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(MobileVLMError, match=f"weights do not match the library: {record['name']} missing"):
        Engine(dist, ldpnet_built.lib)


def test_library_and_weights_of_different_quantizations_are_refused(ldpnet_built, tmp_path):
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.errors import MobileVLMError
    from mobilevlm_mlc.runtime.engine import Engine

    q4 = convert(ldpnet_built.checkpoint, tmp_path / "q4", "q4f32_1", progress=False)
    message = f"{ldpnet_built.lib}: built from a different dist than {q4 / 'mobilevlm-manifest.json'} (quantization: library 'q0f32', dist 'q4f32_1')"
    with pytest.raises(MobileVLMError, match=re.escape(message)):
        Engine(q4, ldpnet_built.lib)


def test_interrupted_convert_leaves_nothing_loadable(ldpnet_built, tmp_path):
    """Kill convert while it writes shards: the target folder never appears."""
    script = (
        "import sys, time\n"
        "from tvm.contrib import tvmjs\n"
        "original = tvmjs.TensorCacheShardingManager._commit_internal\n"
        "def slow_commit(self, *args):\n"
        "    original(self, *args); print('shard', file=sys.stderr, flush=True); time.sleep(30)\n"
        "tvmjs.TensorCacheShardingManager._commit_internal = slow_commit\n"
        "from mobilevlm_mlc.cli import main\n"
        f"sys.exit(main(['convert', {str(ldpnet_built.checkpoint)!r}, '--quantization', 'q0f32', '-o', {str(tmp_path / 'out')!r}, '--quiet']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    assert any(line.strip() == "shard" for line in iter(proc.stderr.readline, ""))  # a shard is on disk
    proc.kill()
    proc.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert leftovers and any(leftovers[0].glob("params_shard_*.bin"))  # partial work sits under a temp name only
