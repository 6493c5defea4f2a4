"""CLIP ViT vision tower in Relax `nn`, stopping at MobileVLM's selected layer.

Parameter names follow HF `CLIPVisionTransformer` (``embeddings.*``, ``pre_layrnorm.*``,
``encoder.layers.{i}.*``); only the layers that feed `hidden_states[select_layer]` exist, so the unused
last layer and `post_layernorm` are neither stored nor computed.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .config import VisionConfig


def quick_gelu(x: Tensor) -> Tensor:
    return x * op.sigmoid(x * 1.702)


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        self.hidden_size = config.hidden_size
        self.num_positions = config.num_patches + 1
        self.class_embedding = nn.Parameter((config.hidden_size,))
        self.patch_embedding = nn.Conv2D(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def embed_patches(self, pixels: Tensor) -> Tensor:
        """[b, c, H, W] -> [b, g*g, d]. A stride-p p x p convolution over non-overlapping patches is one
        matmul of the flattened patches with the flattened kernel: written so, every target's matmul
        schedule takes it (the CPU build had no conv2d schedule: 350 ms of a 2.5 s image encode)."""
        conv = self.patch_embedding
        batch, channels, p = pixels.shape[0], conv.in_channels, conv.kernel_size[0]
        grid = pixels.shape[2] // p
        x = op.reshape(pixels, (batch, channels, grid, p, grid, p))
        x = op.reshape(op.permute_dims(x, [0, 2, 4, 1, 3, 5]), (batch, grid * grid, channels * p * p))
        return op.matmul(x, op.permute_dims(op.reshape(conv.weight, (self.hidden_size, channels * p * p))))

    def forward(self, pixels: Tensor) -> Tensor:
        batch = pixels.shape[0]
        patches = self.embed_patches(pixels)
        cls = op.broadcast_to(op.reshape(self.class_embedding, (1, 1, self.hidden_size)), (batch, 1, self.hidden_size))
        tokens = op.concat([cls, patches], dim=1)
        return tokens + op.reshape(self.position_embedding.weight, (1, self.num_positions, self.hidden_size))


class CLIPAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """Bidirectional attention written out (softmax in float32): TVM's fused attention op lowers to
        ill-typed TIR in fp16, which GPU schedules refuse."""
        b, s, d = x.shape
        heads = (b, s, self.num_heads, self.head_dim)
        q = op.permute_dims(op.reshape(self.q_proj(x) * self.head_dim**-0.5, heads), [0, 2, 1, 3])
        k = op.permute_dims(op.reshape(self.k_proj(x), heads), [0, 2, 3, 1])
        v = op.permute_dims(op.reshape(self.v_proj(x), heads), [0, 2, 1, 3])
        probs = op.softmax(op.matmul(q, k).astype("float32"), axis=-1).astype(x.dtype)
        out = op.permute_dims(op.matmul(probs, v), [0, 2, 1, 3])
        return self.out_proj(op.reshape(out, (b, s, d)))


class CLIPMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_layers_used)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTower(nn.Module):
    """Pixels [b, 3, H, W] -> patch features [b, num_patches, hidden] (CLS dropped)."""

    def __init__(self, config: VisionConfig):
        if config.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {config.hidden_act!r} is not supported (expected 'quick_gelu')")
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return op.split(hidden, [1], axis=1)[1]
