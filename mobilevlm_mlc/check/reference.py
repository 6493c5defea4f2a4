"""PyTorch reference of MobileVLM, built from the field's own pieces, to check the compiled model against.

transformers' `LlamaForCausalLM`, `CLIPVisionModel`, `CLIPImageProcessor` and slow `LlamaTokenizer`,
plus LDP / LDPv2 written with MobileVLM's module structure so that the official state-dict names load
unchanged (`model.mm_projector.model.mb_block.1.block.0.0.weight`, ...). Nothing here is shared with the
TVM path except reading tensors by name from the checkpoint files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mobilevlm_mlc.convert.checkpoint import CheckpointTensors, load_config
from mobilevlm_mlc.convert.packing import dequantize_weight, quantize_weight
from mobilevlm_mlc.model_defs.config import ImageProcessorConfig, MobileVLMConfig
from mobilevlm_mlc.model_defs.projector import make_divisible
from mobilevlm_mlc.model_defs.quantization import GroupQuantScheme, Layout

IMAGE_TOKEN_INDEX = -200
_DECODER_QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight|model\.embed_tokens\.weight|lm_head\.weight"
)
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."


def int8_activations(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x rounded as an int8-activation matmul sees it: per token and per group of `group` inputs,
    q = round_half_even(x * (127 / max|x|)), value q * (max|x| / 127); an all-zero group stays zero."""
    groups = x.float().reshape(*x.shape[:-1], -1, group)
    amax = groups.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(groups * (127 / amax)), 0)
    return (q * (amax / 127)).reshape(x.shape).to(x.dtype)


# ---- projectors with MobileVLM's module structure (torchvision MobileNetV3 / timm pieces) -----------


class LayerNorm2d(nn.LayerNorm):
    """timm `LayerNormAct2d(act_layer=None)`: LayerNorm over channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormActivation(nn.Sequential):
    """torchvision `Conv2dNormActivation` with a LayerNorm2d norm (so the conv has no bias)."""

    def __init__(self, channels: int, kernel: int, stride: int, groups: int, activation: bool):
        layers: list[nn.Module] = [
            nn.Conv2d(channels, channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            LayerNorm2d(channels, eps=1e-5),
        ]
        if activation:
            layers.append(nn.Hardswish())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision `SqueezeExcitation` with a Hardsigmoid scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """torchvision MobileNetV3 `InvertedResidual` with expanded == input channels, SE and hardswish."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            ConvNormActivation(channels, 3, stride, channels, activation=True),
            SqueezeExcitation(channels, make_divisible(channels // 4, 8)),
            ConvNormActivation(channels, 1, 1, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class LDPBlock(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(ouc, 1), InvertedResidual(ouc, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        h = int(math.sqrt(num_tokens))
        x = self.mlp(x)
        x = x.permute(0, 2, 1).reshape(b, -1, h, h)
        x = self.mb_block(x)
        return x.flatten(2).permute(0, 2, 1)


class LDPNetProjector(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.model = LDPBlock(inc, ouc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PosInjectLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=True, groups=channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, c = x.shape
        h = int(math.sqrt(num_tokens))
        feat = x.transpose(1, 2).reshape(b, c, h, h)
        return (self.peg(feat) + feat).flatten(2).transpose(1, 2)


class LDPNetV2Projector(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = FeatureIRLayer(inc, ouc)
        self.dwn = nn.AdaptiveAvgPool2d((12, 12))
        self.peg = PosInjectLayer(ouc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        b, num_tokens, c = x.shape
        h = int(math.sqrt(num_tokens))
        x = self.dwn(x.permute(0, 2, 1).reshape(b, c, h, h)).flatten(2).transpose(1, 2)
        return self.peg(x)


def build_projector(projector_type: str, inc: int, ouc: int) -> nn.Module:
    return {"ldpnet": LDPNetProjector, "ldpnetv2": LDPNetV2Projector}[projector_type](inc, ouc)


# ---- HF modules sized from our config -----------------------------------------------------------------


def llama_config(config: MobileVLMConfig):
    from transformers import LlamaConfig

    t = config.text
    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def clip_vision_config(config: MobileVLMConfig):
    from transformers import CLIPVisionConfig

    v = config.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        attn_implementation="eager",
    )


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """MobileVLM's padding to a square, centred, filled with the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def reference_pixels(image: Image.Image, config: ImageProcessorConfig) -> torch.Tensor:
    """MobileVLM's `process_images` with `image_aspect_ratio: pad`: expand2square, then CLIPImageProcessor."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": config.resize_shortest_edge},
        crop_size={"height": config.crop_size, "width": config.crop_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    background = tuple(int(x * 255) for x in processor.image_mean)
    square = expand2square(image.convert("RGB"), background)
    return processor.preprocess(square, return_tensors="pt")["pixel_values"]


def int8_checkpoint_modules(config: MobileVLMConfig, scheme: GroupQuantScheme) -> set[str]:
    """Checkpoint names of the linears whose compiled matmul keeps NK64, the layout the int8 kernels
    take (a shape NK64 cannot tile falls back to NK: model-dtype activations), as the model says."""
    from mobilevlm_mlc.convert.converter import model_param_shapes
    from mobilevlm_mlc.model_defs.mobilevlm import MobileVLMForCausalLM
    from mobilevlm_mlc.model_defs.quantization import quantized_modules
    from mobilevlm_mlc.model_defs.weights import checkpoint_sources

    sources = checkpoint_sources(config, model_param_shapes(config))
    modules = quantized_modules(MobileVLMForCausalLM(config, scheme))
    return {
        hf.removesuffix(".weight")
        for base, kept in modules.items()
        if kept.layout is Layout.NK64
        for hf in sources[f"{base}.weight"].names
    }


class ReferenceMobileVLM:
    """MobileVLM in PyTorch eager, loaded from an official checkpoint folder."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """`device`: where PyTorch runs it ("cpu"; "cuda" for the GPU peer of `benchmarks/peers.py`)."""
        from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

        self.model_dir = Path(model_dir)
        self.config = config = load_config(self.model_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        tensors = CheckpointTensors(self.model_dir)
        state = {name: torch.from_numpy(tensors.get(name)) for name in tensors.names()}
        self.llm = LlamaForCausalLM(llama_config(config))
        self.vision = CLIPVisionModel(clip_vision_config(config))
        self.projector = build_projector(config.projector_type, config.vision.hidden_size, config.text.hidden_size)
        self._load(self.vision, {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)})
        self._load(
            self.projector, {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        )
        self._load(self.llm, {k: v for k, v in state.items() if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))})
        for module in (self.llm, self.vision, self.projector):
            module.to(self.device, dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), use_fast=False)

    @torch.no_grad()
    def fake_quantize(self, scheme: GroupQuantScheme, int8: bool = False) -> None:
        """Replace the decoder's weights, in place, by what a `scheme` build computes with:
        dequantize(quantize(W)). Then only the kernels and activation precision differ. `int8`: the
        library's quantized matmuls take int8 activations (its build records
        `quantized_matmul_activations: int8`), so the inputs of the decoder's projections and of
        `lm_head` are rounded the same way (`int8_activations`)."""
        for name, param in self.llm.named_parameters():
            if _DECODER_QUANTIZED.fullmatch(name):
                packed = quantize_weight(param.float().cpu().numpy(), scheme, Layout.NK)
                param.copy_(torch.from_numpy(dequantize_weight(*packed, scheme, Layout.NK, param.shape[1])))
        if int8:
            rounded = int8_checkpoint_modules(self.config, scheme)
            for name, module in self.llm.named_modules():
                if name in rounded:
                    module.register_forward_pre_hook(lambda _module, args: (int8_activations(args[0]),))

    @staticmethod
    def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = module.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith(("rotary_emb.inv_freq", "position_ids"))]
        if missing or unexpected:
            raise ValueError(f"reference load: missing {missing}, unexpected {unexpected}")

    # ---- pipeline boundaries ------------------------------------------------------------------------

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return reference_pixels(image, self.config.image_processor).to(self.device, self.dtype)

    def input_ids(self, prompt: str) -> list[int]:
        """MobileVLM's `tokenizer_image_token`: chunks around `<image>`, BOS of later chunks dropped."""
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.tokenizer.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixels, output_hidden_states=True)
        return out.hidden_states[self.config.vision.select_layer][:, 1:]

    @torch.no_grad()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_features(pixels))[0]

    @torch.no_grad()
    def input_embeds(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        parts, start = [], 0
        embed = self.llm.get_input_embeddings()
        for pos in [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]:
            if pos > start:
                parts.append(embed(torch.tensor(ids[start:pos], device=self.device)))
            if pos < len(ids):
                parts.append(image_embeds)
            start = pos + 1
        return torch.cat(parts)[None]

    @torch.no_grad()
    def teacher_forced_logits(self, embeds: torch.Tensor, tokens: list[int]) -> np.ndarray:
        """float32 logits [len(tokens), vocab] predicting each of `tokens` after `embeds` and its predecessors."""
        ids = torch.tensor(tokens[:-1], dtype=torch.long, device=self.device)
        logits = self.llm(inputs_embeds=torch.cat([embeds, self.llm.get_input_embeddings()(ids)[None]], dim=1)).logits[
            0
        ]
        return logits[embeds.shape[1] - 1 :].float().cpu().numpy()

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int, eos_id: int | None = 2) -> tuple[list[int], np.ndarray]:
        """Greedy tokens after `embeds` [1, n, hidden], and the float32 logits that chose the first one."""
        out = self.llm(inputs_embeds=embeds, use_cache=True)
        logits, past = out.logits[0, -1], out.past_key_values
        first_logits = logits.float().cpu().numpy()
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits))
            tokens.append(token)
            if token == eos_id:
                break
            out = self.llm(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1], out.past_key_values
        return tokens, first_logits
