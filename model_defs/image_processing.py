"""MobileVLM's image preprocessing inside the library, so the engine can pass raw RGB bytes as MLC does.

MobileVLM (`image_aspect_ratio: pad`) pads an image to a square with the mean colour (`expand2square`),
then transformers' `CLIPImageProcessor` resizes it (shortest edge, PIL bicubic), centre-crops, rescales
by 1/255 and normalizes. The square makes the resize one `side x side -> size x size` map, separable
into a horizontal and a vertical pass that share one coefficient table. The kernels follow PIL's 8-bit
resampler step for step: its antialiased filter support (scaled by the downscale factor), its tap
bounds, coefficients normalized to sum 1 then held in 22-bit fixed point, and a uint8 rounding after
each pass. The last step maps each byte through a 3 x 256 table computed in numpy float32 exactly as
transformers' rescale + normalize, so it is bit-exact on every target.

Exactness: with the coefficients in float64 (PIL's double; CPUs and CUDA) the pixels equal the
reference's bit for bit at every size (`tests/test_preprocess.py`). GPUs without fp64 (Adreno's OpenCL,
most Vulkan and Metal devices) compute them in float32, which moves a fixed-point coefficient by one
2^-22 step now and then: a byte is one level off PIL's on about 0.05% of the values (measured: at most
1 level, at most 0.07%, over 9 sizes from 2 x 1 to 1600 x 1200). A `size x size` image is not resampled
in either precision (every coefficient exactly 0 or 1), so what MLC's Android app sends (336 x 336) is
exact everywhere.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op

from .config import ImageProcessorConfig

PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 - 8 - 2
BICUBIC_A = -0.5  # PIL's bicubic (Keys) kernel parameter
BICUBIC_SUPPORT = 2


def _i64(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "int64")


def _bicubic(x: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    def c(value: float) -> tirx.PrimExpr:
        return tirx.const(value, dtype)

    x, a = tirx.abs(x), BICUBIC_A
    near = ((c(a + 2) * x - c(a + 3)) * x) * x + c(1)
    far = (((x - c(5)) * x + c(8)) * x - c(4)) * c(a)
    return tirx.Select(x < c(1), near, tirx.Select(x < c(2), far, c(0)))


def _trunc(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """C's (int) of a float: toward zero, as PIL's bounds."""
    return x.astype("int64")


def _clip8(acc: tirx.PrimExpr) -> tirx.PrimExpr:
    """PIL's `clip8`: a fixed-point sum, rounded half up, to a byte."""
    half = tirx.const(1 << (PRECISION_BITS - 1), "int32")
    value = tirx.shift_right(acc + half, tirx.const(PRECISION_BITS, "int32"))
    return tirx.max(tirx.min(value, tirx.const(255, "int32")), tirx.const(0, "int32"))


class _Resampler:
    """PIL's bicubic filter for resizing `side` samples to `size`, for the `count` outputs from `offset`,
    its coefficients computed in `dtype`."""

    def __init__(self, side: tirx.PrimExpr, size: int, offset: int, count: int, dtype: str):
        self.side, self.offset, self.count, self.dtype = side, offset, count, dtype
        self.scale = side.astype(dtype) / self._c(size)
        self.filterscale = tirx.max(self.scale, self._c(1))
        self.support = self._c(BICUBIC_SUPPORT) * self.filterscale
        # PIL's ksize = ceil(support) * 2 + 1, in integers: ceil(2 * side / size), at least 2
        self.taps = 2 * tirx.max(tirx.ceildiv(2 * side, _i64(size)), _i64(BICUBIC_SUPPORT)) + 1

    def _c(self, value: float) -> tirx.PrimExpr:
        return tirx.const(value, self.dtype)

    def _center(self, x: tirx.PrimExpr) -> tirx.PrimExpr:
        return ((x + self.offset).astype(self.dtype) + self._c(0.5)) * self.scale

    def first(self, x: tirx.PrimExpr) -> tirx.PrimExpr:
        """The first input sample that output `x` reads."""
        return tirx.max(_trunc(self._center(x) - self.support + self._c(0.5)), 0)

    def _weight(self, x: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        center, first = self._center(x), self.first(x)
        count = tirx.min(_trunc(center + self.support + self._c(0.5)), self.side) - first
        weight = _bicubic(((k + first).astype(self.dtype) - center + self._c(0.5)) / self.filterscale, self.dtype)
        return tirx.Select(k < count, weight, self._c(0))

    def coefficients(self) -> te.Tensor:
        """[count, taps] in `dtype`: each output's weights, normalized to sum 1."""
        weights = te.compute((self.count, self.taps), self._weight, name="resample_weights")
        k = te.reduce_axis((0, self.taps), name="k")
        total = te.compute((self.count,), lambda x: te.sum(weights[x, k], axis=k), name="resample_weight_sum")

        def normalized(x, k):
            return tirx.Select(total[x] != self._c(0), weights[x, k] / total[x], weights[x, k])

        return te.compute((self.count, self.taps), normalized, name="resample_coefficients")

    def _fixed_point(self, weight: tirx.PrimExpr) -> tirx.PrimExpr:
        """PIL's int32 coefficient: exact from a given weight (a power-of-two scale, then rounding half
        away from zero), so a device that reads the same weights sums the same integers."""
        scaled = weight * self._c(1 << PRECISION_BITS)
        return (scaled + tirx.Select(scaled < self._c(0), self._c(-0.5), self._c(0.5))).astype("int32")

    def accumulate(self, read, coefficients: te.Tensor, x: tirx.PrimExpr) -> tirx.PrimExpr:
        """The fixed-point sum for output sample `x` (`_clip8` makes it a byte); `read(index)` gives the
        int32 input sample at an index of this axis."""
        k = te.reduce_axis((0, coefficients.shape[1]), name="tap")
        index = tirx.min(self.first(x) + k, self.side - 1)  # taps past the count have weight 0
        return te.sum(read(index) * self._fixed_point(coefficients[x, k]), axis=k)


def _resampler(image: te.Tensor, config: ImageProcessorConfig, dtype: str) -> _Resampler:
    size, crop = config.resize_shortest_edge, config.crop_size
    return _Resampler(tirx.max(image.shape[1], image.shape[2]), size, (size - crop) // 2, crop, dtype)


def _coefficients(image: te.Tensor, config: ImageProcessorConfig, dtype: str) -> te.Tensor:
    return _resampler(image, config, dtype).coefficients()


def _resize_rows(image: te.Tensor, coefficients: te.Tensor, config: ImageProcessorConfig, dtype: str) -> te.Tensor:
    """Pad to the square (never materialized) and resample each row: uint8 [side, crop, 3]."""
    _, height, width, _ = image.shape
    resampler = _resampler(image, config, dtype)
    side = resampler.side
    top, left = (side - height) // 2, (side - width) // 2
    fill = [int(mean * 255) for mean in config.image_mean]  # MobileVLM's expand2square background

    def canvas(y, x, c):
        inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
        y_in = tirx.max(tirx.min(y - top, height - 1), 0)
        x_in = tirx.max(tirx.min(x - left, width - 1), 0)
        background = tirx.Select(c == 0, fill[0], tirx.Select(c == 1, fill[1], fill[2]))
        return tirx.Select(inside, image[0, y_in, x_in, c].astype("int32"), background)

    shape = (side, config.crop_size, 3)
    sums = te.compute(
        shape, lambda y, x, c: resampler.accumulate(lambda i: canvas(y, i, c), coefficients, x), name="resize_rows"
    )
    return te.compute(shape, lambda y, x, c: _clip8(sums[y, x, c]).astype("uint8"), name="round_rows")


def _resize_columns(
    image: te.Tensor,
    rows: te.Tensor,
    coefficients: te.Tensor,
    table: te.Tensor,
    config: ImageProcessorConfig,
    dtype: str,
) -> te.Tensor:
    """Resample each column of the row-resized square, then rescale + normalize: float32 [1, 3, crop, crop]."""
    resampler = _resampler(image, config, dtype)
    crop = config.crop_size
    sums = te.compute(
        (3, crop, crop),
        lambda c, y, x: resampler.accumulate(lambda i: rows[i, x, c].astype("int32"), coefficients, y),
        name="resize_columns",
    )
    return te.compute((1, 3, crop, crop), lambda _, c, y, x: table[c, _clip8(sums[c, y, x])], name="rescale_normalize")


def normalization_table(config: ImageProcessorConfig) -> np.ndarray:
    """[3, 256] float32: each byte value rescaled and normalized per channel, with transformers' float32 ops."""
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)[:, None]
    std = np.asarray(config.image_std, np.float32)[:, None]
    return (rescaled[None, :] - mean) / std


def preprocess_image(image: Tensor, config: ImageProcessorConfig, coefficient_dtype: str) -> Tensor:
    """RGB bytes [1, H, W, 3] of any size -> the pixels CLIP takes, float32 [1, 3, crop, crop]. Three
    kernels (coefficients, rows, columns), so each pass reads the one before from memory.
    `coefficient_dtype`: float64 (PIL's precision: bit-exact) where the target has it, else float32."""
    table = Tensor.from_const(normalization_table(config))
    dtype = coefficient_dtype
    coefficients = op.tensor_expr_op(lambda im: _coefficients(im, config, dtype), "resample_coefficients", [image])
    rows = op.tensor_expr_op(lambda im, co: _resize_rows(im, co, config, dtype), "resize_rows", [image, coefficients])
    return op.tensor_expr_op(
        lambda im, ro, co, tb: _resize_columns(im, ro, co, tb, config, dtype),
        "resize_columns",
        [image, rows, coefficients, table],
    )
