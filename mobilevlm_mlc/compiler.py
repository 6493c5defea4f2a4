"""`compile`: dist folder + target -> a library exporting MLC's entry points and `_metadata`."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import tvm
from tvm import relax

from mobilevlm_mlc.formats.dist import Dist, load_dist
from mobilevlm_mlc.formats.manifest import dist_identity, record_library
from mobilevlm_mlc.model_defs.config import KV_CACHES, MAX_BATCH_SIZE
from mobilevlm_mlc.model_defs.mobilevlm import MobileVLMForCausalLM
from mobilevlm_mlc.model_defs.quantization import layout_fallbacks
from mobilevlm_mlc.targets.passes.attach_gpu_sampler import attach_gpu_sampler
from mobilevlm_mlc.targets.passes.attach_logit_processor import attach_logit_processor
from mobilevlm_mlc.targets.passes.attach_sampling_functions import attach_sampling_functions
from mobilevlm_mlc.targets.passes.attach_variable_bounds import attach_variable_bounds
from mobilevlm_mlc.targets.toolchain.cuda_device_code import ToolchainError

from .errors import MobileVLMError, first_line
from .fileio import atomic_file, check_output_file
from .targets import TARGETS, KernelCheckError, get_target


def metadata(dist: Dist, named_params: list, build: dict) -> dict:
    """What `_metadata` returns: every key MLC's engine reads (`cpp/metadata/model.cc`; the ones without a
    default there are always written), plus what our driver checks (hidden size, image tokens, build)."""
    config, text = dist.config, dist.config.text
    return {
        "model_type": "mobilevlm",
        "quantization": dist.quantization.name,
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": config.prefill_chunk_size,
        "max_batch_size": MAX_BATCH_SIZE,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": "kv_cache",
        "model_task": "chat",
        "kv_cache": {
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim,
        },
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "image_size": config.vision.image_size,
        "num_image_tokens": config.num_image_tokens,
        "params": [
            {"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype, "preprocs": []}
            for name, p in named_params
        ],
        "memory_usage": {},  # function -> bytes, filled from the memory plan once lowered (`planned_memory`)
        "build": build,
    }


def _attach_metadata(mod: tvm.IRModule, meta: dict, like: relax.Function | None = None) -> tvm.IRModule:
    """`_metadata` returning `meta` as JSON; `like`: the lowered one it replaces (its attributes kept), once
    the memory plan is known."""
    bb = relax.BlockBuilder()
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta)))
    func = bb.finalize()["_metadata"]
    mod["_metadata"] = func.with_attrs(dict(like.attrs)) if like is not None and like.attrs else func
    return mod


def export_model(model: MobileVLMForCausalLM, target: tvm.target.Target) -> tuple[tvm.IRModule, list]:
    """The model as a Relax IRModule with MLC's entry points, exported under `target`, and the functions
    MLC's engine calls beside them (logit processors, softmax with temperature, the embedding buffer, and
    on CUDA / Vulkan / Metal its GPU sampler)."""
    config = model.config
    model.to(config.dtype)
    with target:
        mod, named_params = model.export_tvm(spec=model.get_default_spec())
    mod = attach_logit_processor(mod, target)
    mod = attach_sampling_functions(mod, config.prefill_chunk_size, config.text.hidden_size, config.dtype)
    mod = attach_gpu_sampler(mod, target)
    # MLC's bounds: a sample per sequence, the engine's top-logprobs at most 6 positions per sample
    bounds = {
        "seq_len": config.prefill_chunk_size,
        "batch_size": MAX_BATCH_SIZE,
        "num_samples": MAX_BATCH_SIZE,
        "num_positions": 6 * MAX_BATCH_SIZE,
    }
    return attach_variable_bounds(mod, bounds), named_params


_ALLOC_STORAGE = (tvm.ir.Op.get("relax.vm.alloc_storage"), tvm.ir.Op.get("relax.memory.alloc_storage"))


def planned_memory(lowered: tvm.IRModule) -> dict[str, int]:
    """Bytes of the static buffers each Relax function allocates once lowered (TVM's memory plan), as
    MLC's memory estimator counts them: what `_metadata.memory_usage` reports."""
    usage = {}
    for gv, func in lowered.functions_items():
        if not isinstance(func, relax.Function):
            continue
        sizes = []

        def visit(expr, sizes=sizes) -> None:
            if isinstance(expr, relax.Call) and expr.op in _ALLOC_STORAGE:
                size = expr.args[0]
                if isinstance(size, relax.ShapeExpr) and isinstance(size.values[0], tvm.tirx.IntImm):
                    sizes.append(int(size.values[0]))

        relax.analysis.post_order_visit(func, visit)
        usage[gv.name_hint] = sum(sizes)
    return usage


def system_lib_prefix(dist: Dist) -> str:
    """Symbol prefix of a static library, e.g. `mobilevlm_ldpnet_q4f16_0_` (TVM 0.27 needs 8+ characters)."""
    stem = re.sub(r"[^0-9a-zA-Z]+", "_", dist.path.name).strip("_").lower()
    if dist.quantization.name not in stem:
        stem = f"{stem}_{dist.quantization.name}"
    return f"{stem}_" if stem.startswith("mobilevlm") else f"mobilevlm_{stem}_"


def compile_model(
    dist_dir: Path, target_name: str, output: Path, cpu: str | None = None, kv_cache: str = "model"
) -> dict:
    """Build the library for `target_name` (on its `--cpu` preset `cpu`) at `output`, its KV cache in
    `kv_cache` (one of KV_CACHES); returns a small report (times, functions)."""
    dist = load_dist(dist_dir)
    try:
        build_target = get_target(target_name)
        preset = build_target.cpu(cpu)
    except KeyError as err:
        raise MobileVLMError(str(err.args[0])) from None
    except ValueError as err:
        raise MobileVLMError(str(err)) from None
    if kv_cache not in KV_CACHES:
        raise MobileVLMError(f"--kv-cache {kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
    if kv_cache == "int8" and not build_target.int8_kv_cache:
        having = ", ".join(name for name, t in TARGETS.items() if t.int8_kv_cache)
        raise MobileVLMError(
            f"--kv-cache int8: target '{target_name}' has no 8-bit KV cache (targets with one: {having})"
        )
    output = Path(output)
    if output.suffix != build_target.library_suffix:
        raise MobileVLMError(f"{output}: target '{target_name}' writes a '{build_target.library_suffix}' library")
    if dist.quantization.name not in build_target.quantizations:
        raise MobileVLMError(
            f"target '{target_name}' does not take {dist.quantization.name} weights (expected one of {', '.join(build_target.quantizations)})"
        )
    missing_tool = build_target.missing_toolchain()
    if missing_tool:
        raise MobileVLMError(f"target '{target_name}': {missing_tool}")
    check_output_file(output, "library")
    identity = dist_identity(dist)  # refuses a dist without a manifest before any work
    started = time.perf_counter()
    target = build_target.tvm_target(cpu)
    scheme = dist.quantization.scheme
    build = build_target.build_info(target, dist.config.dtype, scheme)
    build["kv_cache_dtype"] = "int8" if kv_cache == "int8" else dist.config.dtype
    if preset:
        build |= {"cpu": cpu or build_target.default_cpu, "mcpu": preset.mcpu}
    model = MobileVLMForCausalLM(dist.config, scheme, build_target.image_coefficient_dtype)
    fallbacks = layout_fallbacks(model, scheme) if scheme else {}
    if fallbacks:  # linears whose shape the scheme's layout cannot tile (stored NK, model-dtype activations)
        build["layout_fallbacks"] = fallbacks
    mod, named_params = export_model(model, target)
    mod = _attach_metadata(mod, metadata(dist, named_params, build) | {"dist": identity})
    prefix = system_lib_prefix(dist) if build_target.system_lib else None
    if prefix:
        mod = mod.with_attr("system_lib_prefix", prefix)
    exported = time.perf_counter()
    # TOPI warns that fp16 attention multiplies fp32 probabilities by fp16 values: intended, not news.
    logging.getLogger("topi").setLevel(logging.ERROR)
    try:
        with target:
            lowered = build_target.relax_pipeline(target, int8_kv=kv_cache == "int8")(mod)
    except (KernelCheckError, ValueError) as err:
        raise MobileVLMError(f"target '{target_name}': {err}") from None
    meta = metadata(dist, named_params, build) | {"dist": identity, "memory_usage": planned_memory(lowered)}
    lowered = _attach_metadata(lowered, meta, like=lowered["_metadata"])
    missing = build_target.missing_codegen()
    if missing:
        raise MobileVLMError(f"target '{target_name}': lowering, scheduling and limit checks passed, but {missing}")
    executable = relax.build(lowered, target, relax_pipeline=None, system_lib=build_target.system_lib)
    try:
        with atomic_file(output, "library") as tmp:
            executable.export_library(str(tmp), **build_target.export_options())
    except ToolchainError as err:
        raise MobileVLMError(f"target '{target_name}': {err}") from None
    except RuntimeError as err:  # TVM's errors: the linker or a code generator failed; name the step, in one line
        raise MobileVLMError(
            f"{output}: linking the '{target_name}' library failed ({first_line(err)}); "
            "check the target's toolchain (`mobilevlm-mlc targets`)"
        ) from None
    record_library(
        dist,
        output,
        {
            "target": target_name,
            "tvm_target": str(target),
            "system_lib_prefix": prefix,
            "linker": build_target.linker or "host",
            "build": build,
        },
    )
    finished = time.perf_counter()
    return {
        "target": target_name,
        "output": str(output),
        "system_lib_prefix": prefix,
        "build": build,
        "export_s": exported - started,
        "build_s": finished - exported,
        "functions": sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)),
    }
