"""Architecture configuration of MobileVLM, independent of where it was read from.

`mobilevlm_mlc.convert.checkpoint` builds it from an HF checkpoint; `mlc-chat-config.json` stores it as
`model_config` (``to_dict``) and `compile` reads it back (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

PROJECTOR_TYPES = ("ldpnet", "ldpnetv2")
MODEL_DTYPES = ("float32", "float16")
# Upper bounds far above any LLaMA / CLIP model (LLaMA-70B: hidden 8192, 80 layers), low enough that a
# typo cannot ask for terabytes: every size is checked against them where a config enters.
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 21
MAX_POSITIONS = 1 << 20
MAX_IMAGE_SIZE = 4096
# Tokens per page of the paged KV cache: the engine creates its cache with it, and the CPU decode-attention
# kernel (`targets/cpu_kernels/attention.py`) steps one page at a time (another size falls back to TVM's).
KV_PAGE_SIZE = 16
# how a library stores K and V: in the model's dtype, or int8 with a scale per token and head (CPU targets)
KV_CACHES = ("model", "int8")
# The most sequences a library declares it can decode together (`_metadata.max_batch_size`; MLC's default).
MAX_BATCH_SIZE = 128


class ConfigError(ValueError):
    """A field of the wrong type or out of range: `field` (dotted, e.g. 'text.rope_theta') and what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def within(self, part: str) -> ConfigError:
        return ConfigError(f"{part}.{self.field}", self.problem)


def _check_types(obj: Any) -> None:
    """Every field holds the type its annotation names (JSON gives bools for ints, strings for sizes)."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind.startswith("tuple"):
            ok = isinstance(value, (tuple, list)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            )
        else:
            continue
        if not ok:
            raise ConfigError(f.name, f"is {value!r}, expected {kind}")


def _in_range(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    below = value <= low if open_low else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if open_low else "["
        show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
        raise ConfigError(name, f"is {value!r}, expected a number in {bracket}{show(low)}, {show(high)}]")


def _check_transformer(config: TextConfig | VisionConfig) -> None:
    """What the decoder and the vision tower share: field types, the four sizes in range, whole heads."""
    _check_types(config)
    _in_range("hidden_size", config.hidden_size, 1, MAX_HIDDEN)
    _in_range("intermediate_size", config.intermediate_size, 1, 4 * MAX_HIDDEN)
    _in_range("num_hidden_layers", config.num_hidden_layers, 1, MAX_LAYERS)
    _in_range("num_attention_heads", config.num_attention_heads, 1, config.hidden_size)
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            "hidden_size", f"{config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
        )


@dataclass
class TextConfig:
    """MobileLLaMA / Vicuna decoder (HF `LlamaConfig` keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _check_transformer(self)
        _in_range("num_key_value_heads", self.num_key_value_heads, 1, self.num_attention_heads)
        _in_range("vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _in_range("rms_norm_eps", self.rms_norm_eps, 0, 1, open_low=True)
        _in_range("rope_theta", self.rope_theta, 0, 1e12, open_low=True)
        _in_range("max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_attention_heads",
                f"{self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}",
            )
        if self.head_dim % 2:
            raise ConfigError(
                "hidden_size",
                f"{self.hidden_size} / num_attention_heads {self.num_attention_heads} is an odd head dimension; RoPE rotates pairs",
            )


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionConfig` keys) plus MobileVLM's feature selection."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2  # `mm_vision_select_layer`: index into HF `hidden_states`

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_used(self) -> int:
        """Layers computed: `hidden_states[k]` is the output of the first k layers."""
        total = self.num_hidden_layers + 1
        return self.select_layer % total

    def validate(self) -> None:
        _check_transformer(self)
        _in_range("image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        _in_range("patch_size", self.patch_size, 1, self.image_size)
        _in_range("layer_norm_eps", self.layer_norm_eps, 0, 1, open_low=True)
        if self.num_channels != 3:
            raise ConfigError("num_channels", f"is {self.num_channels}, expected 3")
        if self.hidden_act != "quick_gelu":
            raise ConfigError("hidden_act", f"is {self.hidden_act!r}, expected 'quick_gelu'")
        if self.image_size % self.patch_size:
            raise ConfigError("image_size", f"{self.image_size} is not divisible by patch_size {self.patch_size}")
        total = self.num_hidden_layers + 1
        if not -total <= self.select_layer <= self.num_hidden_layers or self.select_layer % total == 0:
            raise ConfigError(
                "select_layer", f"{self.select_layer} is outside the vision tower's {self.num_hidden_layers} layers"
            )


@dataclass
class ImageProcessorConfig:
    """CLIP preprocessing applied by the driver before `image_embed`."""

    resize_shortest_edge: int = 336
    crop_size: int = 336
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    image_aspect_ratio: str = "pad"

    def validate(self) -> None:
        _check_types(self)
        _in_range("resize_shortest_edge", self.resize_shortest_edge, 1, MAX_IMAGE_SIZE)
        _in_range("crop_size", self.crop_size, 1, self.resize_shortest_edge)
        for name, values, low in (("image_mean", self.image_mean, 0), ("image_std", self.image_std, 1e-6)):
            if len(values) != 3:
                raise ConfigError(name, f"is {list(values)!r}, expected 3 numbers (one per RGB channel)")
            for value in values:
                _in_range(name, value, low, 1)
        if self.image_aspect_ratio != "pad":
            raise ConfigError("image_aspect_ratio", f"is {self.image_aspect_ratio!r}, expected 'pad'")


@dataclass
class MobileVLMConfig:
    """The whole model: decoder, vision tower, projector, and the runtime sizes MLC records."""

    text: TextConfig
    vision: VisionConfig
    projector_type: str
    image_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    context_window_size: int = 2048
    prefill_chunk_size: int = 2048
    dtype: str = "float32"

    @property
    def num_image_tokens(self) -> int:
        """Tokens the projector emits per image: LDP halves the grid, LDPv2 pools it to 12x12."""
        grid = self.vision.grid_size
        if self.projector_type == "ldpnet":
            return ((grid + 1) // 2) ** 2
        return 12 * 12

    def validate(self) -> None:
        """Raise ConfigError (its message names the field) unless every size is sane and consistent."""
        for prefix, part in (("text", self.text), ("vision", self.vision), ("image_processor", self.image_processor)):
            try:
                part.validate()
            except ConfigError as err:
                raise err.within(prefix) from None
        _check_types(self)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(
                "projector_type", f"is {self.projector_type!r}, expected one of {', '.join(PROJECTOR_TYPES)}"
            )
        if self.dtype not in MODEL_DTYPES:
            raise ConfigError("dtype", f"is {self.dtype!r}, expected one of {', '.join(MODEL_DTYPES)}")
        if self.projector_type == "ldpnetv2" and self.vision.grid_size % 12:
            raise ConfigError(
                "projector_type",
                f"ldpnetv2 pools to 12x12, but the vision tower's patch grid is "
                f"{self.vision.grid_size}x{self.vision.grid_size}",
            )
        _in_range("context_window_size", self.context_window_size, 1, MAX_POSITIONS)
        _in_range("prefill_chunk_size", self.prefill_chunk_size, 1, self.context_window_size)
        if self.prefill_chunk_size < self.num_image_tokens:
            raise ConfigError(
                "prefill_chunk_size",
                f"{self.prefill_chunk_size} cannot hold one image's {self.num_image_tokens} tokens",
            )

    def mlc_fields(self) -> dict[str, Any]:
        """The `model_config` keys MLC's engine reads (`ModelConfig::FromJSON`). It reserves
        (image_size / patch_size)^2 embedding rows per image, so `vision_config.patch_size` is the patch
        one image token stands for, not CLIP's: MobileVLM's projector turns the 24 x 24 grid of 14 px
        patches into 12 x 12 tokens, 28 px each (CLIP's 14 would reserve 576 rows for 144 tokens)."""
        v, side = self.vision, math.isqrt(self.num_image_tokens)
        return {
            "vocab_size": self.text.vocab_size,
            "max_batch_size": MAX_BATCH_SIZE,
            "vision_config": {
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_attention_heads": v.num_attention_heads,
                "num_hidden_layers": v.num_hidden_layers,
                "image_size": v.image_size,
                "patch_size": v.image_size // side,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "projection_dim": self.text.hidden_size,
                "dtype": self.dtype,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | self.mlc_fields()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobileVLMConfig:
        """The config `to_dict` wrote, validated; ConfigError names the first bad field."""

        def part(name: str, kind: type, default: dict | None = None) -> Any:
            fields = data.get(name, default)
            if not isinstance(fields, dict):
                raise ConfigError(name, f"is {fields!r}, expected an object")
            known = {f.name: f for f in dataclasses.fields(kind)}
            unknown = sorted(set(fields) - set(known))
            if unknown:
                raise ConfigError(f"{name}.{unknown[0]}", "is not a field of this config")
            missing = [n for n, f in known.items() if n not in fields and f.default is dataclasses.MISSING]
            if missing:
                raise ConfigError(f"{name}.{missing[0]}", "is missing")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

        for key in ("projector_type", "context_window_size", "prefill_chunk_size", "dtype"):
            if key not in data:
                raise ConfigError(key, "is missing")
        data = dict(data)
        mlc = {key: data.pop(key) for key in ("vocab_size", "max_batch_size", "vision_config") if key in data}
        config = cls(
            text=part("text", TextConfig),
            vision=part("vision", VisionConfig),
            projector_type=data["projector_type"],
            image_processor=part("image_processor", ImageProcessorConfig, {}),
            context_window_size=data["context_window_size"],
            prefill_chunk_size=data["prefill_chunk_size"],
            dtype=data["dtype"],
        )
        config.validate()
        implied = config.mlc_fields()
        for key, value in mlc.items():  # MLC's copies of what the fields above say: they must agree
            if isinstance(value, dict) and isinstance(implied[key], dict):  # name the sub-field that differs
                key, value, expected = next(
                    ((f"{key}.{k}", value.get(k), v) for k, v in implied[key].items() if value.get(k) != v),
                    (key, value, implied[key]),
                )
            else:
                expected = implied[key]
            if value != expected:
                raise ConfigError(key, f"is {value!r}, but the rest of the config gives {expected!r}")
        return config
