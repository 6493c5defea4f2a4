"""Where each compiled parameter comes from in an official MobileVLM (HF) checkpoint.

Most parameters are renamed; the decoder's q/k/v and gate/up are concatenated (fused matmuls), and the
projector's 1x1 convolutions become Linear weights. Tensors of the checkpoint that the compiled model
does not need (the vision tower's unused last layer(s), `post_layernorm`, RoPE buffers) are listed by
`is_unused_checkpoint_tensor` so that loading can tell them from genuinely unexpected names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import MobileVLMConfig

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


@dataclass(frozen=True)
class ParamSource:
    """Checkpoint tensors (with their expected shapes) and how they combine into one parameter."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[Sequence[np.ndarray]], np.ndarray]


def _same(name: str, shape: tuple[int, ...]) -> ParamSource:
    return ParamSource((name,), (shape,), lambda arrays: arrays[0])


def _concat(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> ParamSource:
    return ParamSource(tuple(names), tuple(shapes), lambda arrays: np.concatenate(arrays, axis=0))


def _conv1x1_as_linear(name: str, out_features: int, in_features: int) -> ParamSource:
    return ParamSource(
        (name,), ((out_features, in_features, 1, 1),), lambda arrays: arrays[0].reshape(out_features, in_features)
    )


def checkpoint_sources(config: MobileVLMConfig, param_shapes: dict[str, tuple[int, ...]]) -> dict[str, ParamSource]:
    """Map every parameter of `MobileVLMForCausalLM` (name -> shape) to its checkpoint source."""
    text = config.text
    q_dim = text.num_attention_heads * text.head_dim
    kv_dim = text.num_key_value_heads * text.head_dim
    hidden = text.hidden_size
    sources: dict[str, ParamSource] = {}
    for name, shape in param_shapes.items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if name.endswith("self_attn.qkv_proj.weight") and layer:
            prefix = name[: -len("qkv_proj.weight")]
            sources[name] = _concat(
                [f"{prefix}{p}_proj.weight" for p in "qkv"], [(q_dim, hidden), (kv_dim, hidden), (kv_dim, hidden)]
            )
        elif name.endswith("mlp.gate_up_proj.weight") and layer:
            prefix = name[: -len("gate_up_proj.weight")]
            inter = text.intermediate_size
            sources[name] = _concat([f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"], [(inter, hidden)] * 2)
        elif name.startswith(("model.", "lm_head.")):
            sources[name] = _same(name, shape)
        elif name.startswith("vision_tower."):
            sources[name] = _same(VISION_PREFIX + name[len("vision_tower.") :], shape)
        elif name.startswith("mm_projector."):
            sources[name] = _projector_source(config.projector_type, name[len("mm_projector.") :], shape)
        else:
            raise KeyError(f"no checkpoint source is known for parameter {name}")
    return sources


def _projector_source(projector_type: str, name: str, shape: tuple[int, ...]) -> ParamSource:
    if projector_type == "ldpnetv2":
        renames = {"mlp.fc1.": "mlp.mlp.0.", "mlp.fc2.": "mlp.mlp.2.", "peg.": "peg.peg.0."}
    else:
        renames = {"mlp.fc1.": "model.mlp.1.", "mlp.fc2.": "model.mlp.3."}
        block = re.match(r"blocks\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if block:
            index, module, kind = int(block.group(1)), block.group(2), block.group(3)
            hf_module = {
                "depthwise": "block.0.0",
                "depthwise_norm": "block.0.1",
                "se_fc1": "block.1.fc1",
                "se_fc2": "block.1.fc2",
                "pointwise": "block.2.0",
                "pointwise_norm": "block.2.1",
            }[module]
            hf_name = f"{PROJECTOR_PREFIX}model.mb_block.{index + 1}.{hf_module}.{kind}"
            if module in ("se_fc1", "se_fc2", "pointwise") and kind == "weight":
                return _conv1x1_as_linear(hf_name, shape[0], shape[1])
            return _same(hf_name, shape)
    for ours, theirs in renames.items():
        if name.startswith(ours):
            return _same(PROJECTOR_PREFIX + theirs + name[len(ours) :], shape)
    raise KeyError(f"no checkpoint source is known for projector parameter {name}")


def is_unused_checkpoint_tensor(name: str, config: MobileVLMConfig) -> bool:
    """Tensors an official checkpoint carries that the compiled model never reads."""
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
        return True
    if not name.startswith(VISION_PREFIX):
        return False
    rest = name[len(VISION_PREFIX) :]
    if rest.startswith("post_layernorm.") or rest == "embeddings.position_ids":
        return True
    layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
    return bool(layer) and config.vision.num_layers_used <= int(layer.group(1)) < config.vision.num_hidden_layers
