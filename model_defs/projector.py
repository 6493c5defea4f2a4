"""MobileVLM's projectors in Relax `nn`: LDP (`ldpnet`, V1) and LDPv2 (`ldpnetv2`, V2).

Both take CLIP patch features [b, g*g, mm_hidden] and return image tokens [b, T, hidden]. The
feature map is kept channels-last (NHWC) so that channel LayerNorm and the 1x1 convolutions are plain
last-axis LayerNorm / Linear; only the depthwise 3x3 convolutions run in NCHW. The 1x1 conv weights
of the checkpoint are stored as Linear weights (see `model_defs.weights`).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op


def hardsigmoid(x: Tensor) -> Tensor:
    return op.relu6(x + 3.0) / 6.0


def hardswish(x: Tensor) -> Tensor:
    return x * hardsigmoid(x)


def depthwise_conv_nhwc(conv: nn.Conv2D, x: Tensor) -> Tensor:
    return op.permute_dims(conv(op.permute_dims(x, [0, 3, 1, 2])), [0, 2, 3, 1])


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`, which sizes MobileNetV3's squeeze-excite."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class FeatureMLP(nn.Module):
    """Linear -> exact GELU -> Linear, lifting CLIP features to the LLM width."""

    def __init__(self, in_features: int, out_features: int):
        self.fc1 = nn.Linear(in_features, out_features)
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(op.gelu(self.fc1(x)))


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion: dw3x3 -> LN -> hardswish -> SE -> pw1x1 -> LN (+x if stride 1)."""

    def __init__(self, channels: int, stride: int):
        squeeze = make_divisible(channels // 4, 8)
        self.stride = stride
        self.depthwise = nn.Conv2D(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        self.depthwise_norm = nn.LayerNorm(channels, eps=1e-5)
        self.se_fc1 = nn.Linear(channels, squeeze)
        self.se_fc2 = nn.Linear(squeeze, channels)
        self.pointwise = nn.Linear(channels, channels, bias=False)
        self.pointwise_norm = nn.LayerNorm(channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, h, w, c]
        y = hardswish(self.depthwise_norm(depthwise_conv_nhwc(self.depthwise, x)))
        _, h, w, _ = y.shape
        pooled = op.sum(y, axis=[1, 2], keepdims=True) / float(h * w)
        y = y * hardsigmoid(self.se_fc2(op.relu(self.se_fc1(pooled))))
        y = self.pointwise_norm(self.pointwise(y))
        return x + y if self.stride == 1 else y


class LDPNetProjector(nn.Module):
    """`ldpnet`: MLP, then a stride-1 and a stride-2 inverted residual block (g x g -> ceil(g/2)^2 tokens)."""

    def __init__(self, mm_hidden_size: int, hidden_size: int, grid_size: int):
        self.grid_size = grid_size
        self.mlp = FeatureMLP(mm_hidden_size, hidden_size)
        self.blocks = nn.ModuleList([InvertedResidual(hidden_size, 1), InvertedResidual(hidden_size, 2)])

    def forward(self, features: Tensor) -> Tensor:
        b, _, _ = features.shape
        x = self.mlp(features)
        c = x.shape[-1]
        x = op.reshape(x, (b, self.grid_size, self.grid_size, c))
        for block in self.blocks:
            x = block(x)
        _, h, w, _ = x.shape
        return op.reshape(x, (b, h * w, c))


class LDPNetV2Projector(nn.Module):
    """`ldpnetv2`: MLP, 12x12 adaptive average pool, then a depthwise 3x3 conv added as positional encoding."""

    pooled_size = 12

    def __init__(self, mm_hidden_size: int, hidden_size: int, grid_size: int):
        if grid_size % self.pooled_size:
            raise ValueError(f"ldpnetv2 needs a patch grid divisible by 12, got {grid_size}")
        self.grid_size = grid_size
        self.mlp = FeatureMLP(mm_hidden_size, hidden_size)
        self.peg = nn.Conv2D(hidden_size, hidden_size, 3, stride=1, padding=1, groups=hidden_size, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        b, _, _ = features.shape
        x = self.mlp(features)
        c = x.shape[-1]
        p, k = self.pooled_size, self.grid_size // self.pooled_size
        x = op.sum(op.reshape(x, (b, p, k, p, k, c)), axis=[2, 4]) / float(k * k)
        x = x + depthwise_conv_nhwc(self.peg, x)
        return op.reshape(x, (b, p * p, c))
