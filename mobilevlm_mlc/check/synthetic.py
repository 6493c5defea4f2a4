"""Random-weight MobileVLM checkpoints in the exact official HF layout, deterministic from a seed.

No model hub is reachable, so tests, the demo and the benchmarks build their own: `config.json` with
MobileVLM's keys, `pytorch_model.bin` (bf16, official tensor names; or `model.safetensors`, optionally
sharded with an index), the LLaMA SentencePiece tokenizer that `mistral-common` ships, and, for sizes
other than ViT-L/336, a CLIP config folder named by `mm_vision_tower`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilevlm_mlc.fileio import atomic_dir


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int


SHAPES = {
    # Small enough to convert, compile and run in seconds on 2 cores; real 336 px / 576-patch geometry.
    "tiny": Shape(256, 704, 4, 4, 128, 512, 4, 4),
    # An intermediate size that neither the group (32) nor NK64's row tile (64) divides: the MLP's
    # linears get a zero-padded last group and fall back to NK; attention and lm_head keep NK64.
    "tiny-odd": Shape(320, 344, 2, 4, 128, 512, 4, 4),
    # MobileVLM-1.7B / V2-1.7B: MobileLLaMA-1.4B and CLIP ViT-L/14-336.
    "1.7b": Shape(2048, 5632, 24, 16, 1024, 4096, 24, 16),
    # MobileVLM-3B / V2-3B: MobileLLaMA-2.7B.
    "3b": Shape(2560, 6912, 32, 32, 1024, 4096, 24, 16),
}
VISION_FOLDER = "clip-vision-tower"


def tokenizer_model_path() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mistral-common's LLaMA SentencePiece model is missing")
    return path


def _config_json(shape: Shape, projector: str, vision_tower: str) -> dict:
    return {
        "_name_or_path": f"{NAME_PREFIX}{projector}",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 2048,
        "max_sequence_length": 2048,
        "mm_hidden_size": shape.vision_hidden_size,
        "mm_projector_type": projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "model_type": "mobilevlm",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_attention_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": 32000,
    }


def _vision_config_json(shape: Shape) -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "hidden_size": shape.vision_hidden_size,
        "image_size": 336,
        "intermediate_size": shape.vision_intermediate_size,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": shape.vision_heads,
        "num_channels": 3,
        "num_hidden_layers": shape.vision_layers,
        "patch_size": 14,
        "projection_dim": 768,
    }


PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {
        "__type": "AddedToken",
        "content": "<s>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    },
    "clean_up_tokenization_spaces": False,
    "eos_token": {
        "__type": "AddedToken",
        "content": "</s>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    },
    "legacy": True,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {
        "__type": "AddedToken",
        "content": "<unk>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    },
}

SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}


@torch.no_grad()
def random_state_dict(config_json: dict, vision_json: dict, seed: int) -> dict[str, torch.Tensor]:
    """Official-name tensors: the reference modules' own parameters, re-drawn from a seeded generator."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from mobilevlm_mlc.model_defs.config import MobileVLMConfig, TextConfig, VisionConfig

    from .reference import build_projector, clip_vision_config, llama_config

    c, v = config_json, vision_json
    config = MobileVLMConfig(
        text=TextConfig(
            c["hidden_size"],
            c["intermediate_size"],
            c["num_hidden_layers"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["vocab_size"],
        ),
        vision=VisionConfig(v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"]),
        projector_type=c["mm_projector_type"],
    )
    modules = {
        "": LlamaForCausalLM(llama_config(config)),
        "model.vision_tower.vision_tower.": CLIPVisionModel(clip_vision_config(config)),
        "model.mm_projector.": build_projector(config.projector_type, v["hidden_size"], c["hidden_size"]),
    }
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):  # norm scales around 1, so a mix-up shows
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif param.dim() == 1:
                value = 0.02 * torch.randn(param.shape, generator=gen)
            else:  # fan-in scaled: every layer moves the residual stream, so greedy text varies
                fan_in = param[0].numel() if "embed" not in name else 1
                value = torch.randn(param.shape, generator=gen) / fan_in**0.5
            state[prefix + name] = value.to(torch.bfloat16).contiguous()
    return state


NAME_PREFIX = "mobilevlm-mlc/random-"  # config.json's `_name_or_path` of every checkpoint made here


def checkpoint_files(folder: Path) -> set[str] | None:
    """What `make_checkpoint` wrote in `folder` (recognized by its config's name), or None."""
    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name.startswith(NAME_PREFIX):
        return None
    patterns = (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        f"{VISION_FOLDER}/config.json",
        f"{VISION_FOLDER}/preprocessor_config.json",
        "pytorch_model*.bin",
        "model*.safetensors",
        "*.index.json",
    )
    return {p.relative_to(folder).as_posix() for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()}


def make_checkpoint(
    out_dir: Path,
    projector: str = "ldpnet",
    size: str = "tiny",
    seed: int = 0,
    weights_format: str = "bin",
    num_shards: int = 1,
) -> Path:
    """Write a random-weight checkpoint folder; `weights_format` is 'bin' or 'safetensors'."""
    shape = SHAPES[size]
    standard = not size.startswith("tiny")
    vision_tower = "openai/clip-vit-large-patch14-336" if standard else VISION_FOLDER
    config = _config_json(shape, projector, vision_tower)
    vision = _vision_config_json(shape)
    state = random_state_dict(config, vision, seed)
    with atomic_dir(Path(out_dir), checkpoint_files) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not standard:
            (tmp / VISION_FOLDER).mkdir()
            (tmp / VISION_FOLDER / "config.json").write_text(json.dumps(vision, indent=2) + "\n")
            (tmp / VISION_FOLDER / "preprocessor_config.json").write_text(
                json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n"
            )
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}) + "\n"
        )
        (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
        shutil.copyfile(tokenizer_model_path(), tmp / "tokenizer.model")
        _write_weights(tmp, state, weights_format, num_shards)
    return Path(out_dir)


def _write_weights(folder: Path, state: dict[str, torch.Tensor], weights_format: str, num_shards: int) -> None:
    base = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}[weights_format]
    names = list(state)
    per_shard = -(-len(names) // num_shards)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for index, group in enumerate(groups):
        stem, ext = base.rsplit(".", 1)
        file = base if num_shards == 1 else f"{stem}-{index + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {n: state[n] for n in group}
        if weights_format == "bin":
            torch.save(part, folder / file)
        else:
            from safetensors.torch import save_file

            save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    if num_shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{base}.index.json").write_text(json.dumps(index, indent=2) + "\n")
