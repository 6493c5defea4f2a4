"""Quantization schemes by MLC name, and the numpy side of 4-bit group quantization (packing at convert).

`q0f32` / `q0f16` keep every weight in the model dtype. The `q4*` schemes quantize the decoder's
linears, its embedding and `lm_head`; norms, biases, the CLIP tower and the projector stay in the model
dtype (the vision path is small next to the decoder and is the part MLC never quantizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_defs.quantization import ROW_TILE, GroupQuantScheme

from .errors import MobileVLMError


@dataclass(frozen=True)
class Quantization:
    name: str
    model_dtype: str  # activations, norms, the vision tower, and unquantized weights
    scheme: GroupQuantScheme | None = None


QUANTIZATIONS = {
    q.name: q
    for q in (
        Quantization("q0f32", "float32"),
        Quantization("q0f16", "float16"),
        Quantization("q4f16_1", "float16", GroupQuantScheme("q4f16_1", "float16", "NK")),
        Quantization("q4f32_1", "float32", GroupQuantScheme("q4f32_1", "float32", "NK")),
        Quantization("q4f16_0", "float16", GroupQuantScheme("q4f16_0", "float16", "KN")),
        Quantization("q4f16_3", "float16", GroupQuantScheme("q4f16_3", "float16", "NK64")),
        Quantization("q4f32_3", "float32", GroupQuantScheme("q4f32_3", "float32", "NK64")),
    )
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise MobileVLMError(f"unknown quantization '{name}' (expected one of {', '.join(QUANTIZATIONS)})")
    return QUANTIZATIONS[name]


def quantize_weight(weight: np.ndarray, scheme: GroupQuantScheme, layout: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W[out, in] (float) -> (q_weight uint32, q_scale) in `layout` (default: the scheme's); `in` padded
    with zeros to whole groups.

    scale = max|w| over a group of 32 inputs / 7, rounded to the scale dtype; q = clip(round(w / scale
    + 7), 0, 14) with that rounded scale, so that (q - 7) * scale is as close to w as the storage allows.
    An all-zero group gets scale 0 and q = 7.
    """
    layout = layout or scheme.layout
    out_features, in_features = weight.shape
    padded = scheme.groups(in_features) * scheme.group_size  # the last group zero-padded (MLC's rule)
    packed = np.empty((out_features, padded // scheme.per_word), np.uint32)
    scale = np.empty((out_features, padded // scheme.group_size), scheme.model_dtype)
    for start in range(0, out_features, _ROWS_PER_STEP):  # bounded temporaries for 32000-row tables
        rows = weight[start : start + _ROWS_PER_STEP]
        if padded != in_features:
            rows = np.pad(rows, ((0, 0), (0, padded - in_features)))
        packed[start : start + _ROWS_PER_STEP], scale[start : start + _ROWS_PER_STEP] = _quantize_rows(rows, scheme)
    if layout == "KN":
        return np.ascontiguousarray(packed.T), np.ascontiguousarray(scale.T)
    if layout == "NK64":
        return _interleave_rows(packed), _interleave_rows(scale)
    return packed, scale


def _interleave_rows(a: np.ndarray) -> np.ndarray:
    """[n, c] -> [n/64, c, 64]: column j of 64 consecutive rows side by side (the NK64 layout)."""
    return np.ascontiguousarray(a.reshape(-1, ROW_TILE, a.shape[1]).transpose(0, 2, 1))


_ROWS_PER_STEP = 2048


def _quantize_rows(weight: np.ndarray, scheme: GroupQuantScheme) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = weight.shape
    groups = weight.astype(np.float32).reshape(rows, cols // scheme.group_size, scheme.group_size)
    scale = (np.abs(groups).max(axis=-1) / scheme.max_int).astype(scheme.model_dtype)
    divisor = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(divisor > 0, np.round(groups / np.where(divisor > 0, divisor, 1)), 0) + scheme.max_int
    q = np.clip(q, 0, 2 * scheme.max_int).astype(np.uint32).reshape(rows, cols // scheme.per_word, scheme.per_word)
    shifts = np.arange(scheme.per_word, dtype=np.uint32) * scheme.bits
    return np.bitwise_or.reduce(q << shifts, axis=-1), scale


def dequantize_weight(q_weight: np.ndarray, q_scale: np.ndarray, scheme: GroupQuantScheme, layout: str | None = None,
                      in_features: int | None = None) -> np.ndarray:
    """The inverse view: W[out, in] in float32 from packed storage (`in_features` cuts the padding off)."""
    layout = layout or scheme.layout
    if layout == "KN":
        q_weight, q_scale = q_weight.T, q_scale.T
    elif layout == "NK64":  # [n/64, c, 64] -> [n, c]
        q_weight, q_scale = (a.transpose(0, 2, 1).reshape(-1, a.shape[1]) for a in (q_weight, q_scale))
    shifts = np.arange(scheme.per_word, dtype=np.uint32) * scheme.bits
    q = (q_weight[..., None] >> shifts) & ((1 << scheme.bits) - 1)
    q = q.reshape(q_weight.shape[0], -1).astype(np.float32) - scheme.max_int
    return (q * np.repeat(q_scale.astype(np.float32), scheme.group_size, axis=1))[:, :in_features]
