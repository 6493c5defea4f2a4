"""`convert`: official checkpoint -> MLC dist folder (tensor cache + mlc-chat-config.json + tokenizer).

Tensors stream through one at a time (plus the current ~32 MB shard); the folder appears only when
complete (written under a temp name, then renamed).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mobilevlm_mlc.errors import MobileVLMError, summarize
from mobilevlm_mlc.fileio import atomic_dir
from mobilevlm_mlc.formats.dist import CHAT_CONFIG, TOKENIZER_FILES, TOKENIZER_MODEL, V1_TEMPLATE
from mobilevlm_mlc.formats.manifest import convert_manifest, dist_files, write_manifest
from mobilevlm_mlc.model_defs.config import MobileVLMConfig
from mobilevlm_mlc.model_defs.mobilevlm import MobileVLMForCausalLM
from mobilevlm_mlc.model_defs.quantization import Quantization, get_quantization, quantized_modules
from mobilevlm_mlc.model_defs.weights import ParamSource, checkpoint_sources, is_unused_checkpoint_tensor
from mobilevlm_mlc.runtime.tokenizer import Tokenizer

from .checkpoint import FLOAT_DTYPES, CheckpointTensors, input_files, load_config, validate_config, vision_tower_folders
from .packing import quantize_weight


def model_param_shapes(config: MobileVLMConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the unquantized model's parameters (what the checkpoint provides)."""
    model = MobileVLMForCausalLM(config)
    return {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}


def stored_params(config: MobileVLMConfig, quant: Quantization) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names -> (shape, dtype) of what the dist stores and the library takes, in export order."""
    model = MobileVLMForCausalLM(config, quant.scheme)
    model.to(quant.model_dtype)
    return {name: (tuple(int(d) for d in p.shape), p.dtype) for name, p in model.named_parameters()}


def stored_bytes(config: MobileVLMConfig, quant: Quantization) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in stored_params(config, quant).values())


def plan_sources(config: MobileVLMConfig, tensors: CheckpointTensors) -> dict[str, ParamSource]:
    """Match the checkpoint against the model: every needed tensor present with the right shape, nothing unknown."""
    sources = checkpoint_sources(config, model_param_shapes(config))
    needed = {n: s for src in sources.values() for n, s in zip(src.names, src.shapes)}
    present = set(tensors.names())
    missing = sorted(set(needed) - present)
    unexpected = sorted(n for n in present - set(needed) if not is_unused_checkpoint_tensor(n, config))
    where = tensors.model_dir
    if missing:
        raise MobileVLMError(f"{where}: the checkpoint lacks {summarize(missing, 'tensor', 'tensors')}")
    if unexpected:
        raise MobileVLMError(
            f"{where}: the checkpoint holds {summarize(unexpected, 'unexpected tensor', 'unexpected tensors')}"
        )
    for name, shape in needed.items():
        found = tensors.shape(name)
        if found != shape:
            raise MobileVLMError(
                f"{where}: tensor {name} has shape {list(found)}, expected {list(shape)} from config.json"
            )
        dtype = tensors.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise MobileVLMError(
                f"{where}: tensor {name} has dtype {dtype}, expected a floating-point type ({', '.join(FLOAT_DTYPES)})"
            )
    return sources


def iter_params(
    sources: dict[str, ParamSource],
    tensors: CheckpointTensors,
    config: MobileVLMConfig,
    quant: Quantization,
    progress: bool,
) -> Iterator[tuple[str, np.ndarray]]:
    """Each stored tensor in turn: combined from the checkpoint, then cast, or packed to int4 with its scales."""
    quantized = quantized_modules(MobileVLMForCausalLM(config, quant.scheme)) if quant.scheme else {}
    with tqdm(
        total=stored_bytes(config, quant), unit="B", unit_scale=True, desc="convert", disable=not progress
    ) as bar:
        for i, (name, src) in enumerate(sources.items()):
            bar.set_postfix_str(f"tensor {i + 1}/{len(sources)}", refresh=False)
            array = src.combine([tensors.get(n) for n in src.names])
            base = name.removesuffix(".weight")
            if base in quantized:
                outputs = zip((f"{base}.q_weight", f"{base}.q_scale"), quantize_weight(array, quantized[base]))
            else:
                outputs = [(name, array.astype(quant.model_dtype))]
            for out_name, out in outputs:
                out = np.ascontiguousarray(out)
                bar.update(out.nbytes)
                yield out_name, out


def chat_config(config: MobileVLMConfig, quantization: Quantization, tokenizer_files: list[str]) -> dict:
    """`mlc-chat-config.json` in MLC's schema (version 0.1.0)."""
    return {
        "version": "0.1.0",
        "model_type": "mobilevlm",
        "quantization": quantization.name,
        "model_config": config.to_dict(),
        "vocab_size": config.text.vocab_size,
        "context_window_size": config.context_window_size,
        "sliding_window_size": -1,
        "prefill_chunk_size": config.prefill_chunk_size,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "temperature": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": {
            "token_postproc_method": "byte_fallback",
            "prepend_space_in_encode": True,
            "strip_space_in_decode": True,
        },
        "conv_template": V1_TEMPLATE,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "model_task": "chat",
    }


def convert(
    model_dir: Path,
    out_dir: Path,
    quantization: str,
    *,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    progress: bool = True,
) -> Path:
    from tvm.contrib import tvmjs

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant = get_quantization(quantization)
    config = load_config(model_dir)
    config.dtype = quant.model_dtype
    if context_window_size is not None:
        config.context_window_size = context_window_size
    config.prefill_chunk_size = min(prefill_chunk_size or config.prefill_chunk_size, config.context_window_size)
    validate_config(config, "--context-window-size / --prefill-chunk-size")
    tokenizer = Tokenizer(model_dir / TOKENIZER_MODEL)  # a corrupt one is refused here, not at the first run
    if tokenizer.vocab_size > config.text.vocab_size:
        raise MobileVLMError(
            f"{model_dir / TOKENIZER_MODEL}: {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {config.text.vocab_size} in config.json"
        )
    tensors = CheckpointTensors(model_dir)
    sources = plan_sources(config, tensors)
    with atomic_dir(
        out_dir, dist_files, [model_dir, *vision_tower_folders(model_dir)]
    ) as tmp:  # refuses the output before writing
        param_count = sum(int(np.prod(s)) for s in model_param_shapes(config).values())
        param_bytes = stored_bytes(config, quant)
        with contextlib.redirect_stdout(io.StringIO()):  # dump_tensor_cache prints a summary line
            tvmjs.dump_tensor_cache(
                iter_params(sources, tensors, config, quant, progress),
                str(tmp),
                encode_format="raw",
                show_progress=False,
                meta_data={
                    "ParamSize": param_count,
                    "ParamBytes": param_bytes,
                    "BitsPerParam": 8.0 * param_bytes / param_count,
                },
            )
        copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
        for name in copied:
            shutil.copyfile(model_dir / name, tmp / name)
        (tmp / CHAT_CONFIG).write_text(json.dumps(chat_config(config, quant, copied), indent=2) + "\n")
        inputs = input_files(model_dir, tensors) + [model_dir / name for name in copied]
        names = {(f.relative_to(model_dir).as_posix() if f.is_relative_to(model_dir) else str(f)): f for f in inputs}
        write_manifest(tmp, convert_manifest(names, quant.name, config.to_dict()))
    return out_dir
