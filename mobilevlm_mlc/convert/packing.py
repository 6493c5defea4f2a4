"""The numpy side of 4-bit group quantization: packing at convert, and the inverse view for references.
The schemes themselves are `model_defs.quantization`'s."""

from __future__ import annotations

import numpy as np

from mobilevlm_mlc.model_defs.quantization import ROW_TILE, GroupQuantScheme, Layout


def quantize_weight(
    weight: np.ndarray, scheme: GroupQuantScheme, layout: Layout | None = None
) -> tuple[np.ndarray, np.ndarray]:
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
    if layout is Layout.KN:
        return np.ascontiguousarray(packed.T), np.ascontiguousarray(scale.T)
    if layout is Layout.NK64:
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


def dequantize_weight(
    q_weight: np.ndarray,
    q_scale: np.ndarray,
    scheme: GroupQuantScheme,
    layout: Layout | None = None,
    in_features: int | None = None,
) -> np.ndarray:
    """The inverse view: W[out, in] in float32 from packed storage (`in_features` cuts the padding off)."""
    layout = layout or scheme.layout
    if layout is Layout.KN:
        q_weight, q_scale = q_weight.T, q_scale.T
    elif layout is Layout.NK64:  # [n/64, c, 64] -> [n, c]
        q_weight, q_scale = (a.transpose(0, 2, 1).reshape(-1, a.shape[1]) for a in (q_weight, q_scale))
    shifts = np.arange(scheme.per_word, dtype=np.uint32) * scheme.bits
    q = (q_weight[..., None] >> shifts) & ((1 << scheme.bits) - 1)
    q = q.reshape(q_weight.shape[0], -1).astype(np.float32) - scheme.max_int
    return (q * np.repeat(q_scale.astype(np.float32), scheme.group_size, axis=1))[:, :in_features]
