"""`compile`: dist folder + target -> a library exporting MLC's entry points and `_metadata`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import tvm
from tvm import relax

from model_defs.mobilevlm import MobileVLMForCausalLM
from targets import get_target

from .dist import Dist, load_dist
from .errors import MobileVLMError
from .fileio import atomic_file


def metadata(dist: Dist, named_params: list) -> dict:
    """What `_metadata` returns: enough for the driver to check the weights and size the KV cache."""
    config = dist.config
    return {
        "model_type": "mobilevlm",
        "quantization": dist.quantization.name,
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": config.prefill_chunk_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "hidden_size": config.text.hidden_size,
        "vocab_size": config.text.vocab_size,
        "image_size": config.vision.image_size,
        "num_image_tokens": config.num_image_tokens,
        "params": [
            {"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype} for name, p in named_params
        ],
        "memory_usage": {},
    }


def _attach_metadata(mod: tvm.IRModule, meta: dict) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta)))
    mod["_metadata"] = bb.finalize()["_metadata"]
    return mod


def compile_model(dist_dir: Path, target_name: str, output: Path) -> dict:
    """Build the library for `target_name` at `output`; returns a small report (times, functions)."""
    dist = load_dist(dist_dir)
    try:
        build_target = get_target(target_name)
    except KeyError as err:
        raise MobileVLMError(str(err.args[0])) from None
    output = Path(output)
    if output.suffix != build_target.library_suffix:
        raise MobileVLMError(f"{output}: target '{target_name}' writes a '{build_target.library_suffix}' library")
    started = time.perf_counter()
    target = build_target.tvm_target()
    model = MobileVLMForCausalLM(dist.config, dist.quantization.scheme)
    model.to(dist.config.dtype)
    with target:
        mod, named_params = model.export_tvm(spec=model.get_default_spec())
    mod = _attach_metadata(mod, metadata(dist, named_params))
    exported = time.perf_counter()
    # TOPI warns that fp16 attention multiplies fp32 probabilities by fp16 values: intended, not news.
    logging.getLogger("topi").setLevel(logging.ERROR)
    executable = relax.build(mod, target, relax_pipeline=build_target.relax_pipeline(target))
    with atomic_file(output) as tmp:
        executable.export_library(str(tmp))
    finished = time.perf_counter()
    return {
        "target": target_name,
        "output": str(output),
        "export_s": exported - started,
        "build_s": finished - exported,
        "functions": sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)),
    }
