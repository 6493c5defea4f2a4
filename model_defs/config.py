"""Architecture configuration of MobileVLM, independent of where it was read from.

`mobilevlm_mlc.checkpoint` builds it from an HF checkpoint; `mlc-chat-config.json` stores it as
`model_config` (``to_dict``) and `compile` reads it back (``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROJECTOR_TYPES = ("ldpnet", "ldpnetv2")


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


@dataclass
class ImageProcessorConfig:
    """CLIP preprocessing applied by the driver before `image_embed`."""

    resize_shortest_edge: int = 336
    crop_size: int = 336
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    image_aspect_ratio: str = "pad"


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobileVLMConfig:
        processor = dict(data.get("image_processor", {}))
        for key in ("image_mean", "image_std"):
            if key in processor:
                processor[key] = tuple(processor[key])
        return cls(
            text=TextConfig(**data["text"]),
            vision=VisionConfig(**data["vision"]),
            projector_type=data["projector_type"],
            image_processor=ImageProcessorConfig(**processor),
            context_window_size=data["context_window_size"],
            prefill_chunk_size=data["prefill_chunk_size"],
            dtype=data["dtype"],
        )
