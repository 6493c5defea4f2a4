"""Image preprocessing identical to MobileVLM's: pad to square with the mean colour, then CLIP's
resize (shortest edge, bicubic) -> centre crop -> rescale 1/255 -> normalize. Output [1, 3, S, S]."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.model_defs.config import ImageProcessorConfig

# Pad-to-square makes a side x side canvas of the longer side: that, not width x height, is what an
# image costs. Bounded by PIL's own decompression-bomb limit (about 9459 x 9459).
MAX_CANVAS_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def check_image_size(size: tuple[int, int], where: object) -> None:
    """Refuse, before anything is decoded or allocated, an image whose padded square would be too large."""
    width, height = size
    if width < 1 or height < 1:
        raise MobileVLMError(f"{where}: image is {width}x{height}, expected at least 1x1 pixels")
    side = max(width, height)
    if side * side > MAX_CANVAS_PIXELS:
        raise MobileVLMError(
            f"{where}: image is {width}x{height}; padded to a square it would be {side}x{side} = "
            f"{side * side} pixels, more than the {MAX_CANVAS_PIXELS} allowed (scale it down first)"
        )


def load_image(path: Path) -> Image.Image:
    """Open any PIL-readable image fully (so truncation shows here) and convert it to RGB; its size is
    checked from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise MobileVLMError(f"{path}: image not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
            with Image.open(path) as img:
                check_image_size(img.size, path)
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MobileVLMError(f"{path}: image too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MobileVLMError(f"{path}: not a readable image ({err})") from None


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess(image: Image.Image, config: ImageProcessorConfig, dtype: str = "float32") -> np.ndarray:
    check_image_size(image.size, "image")
    image = image.convert("RGB")
    background = tuple(int(x * 255) for x in config.image_mean)
    image = expand_to_square(image, background)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = config.resize_shortest_edge, int(config.resize_shortest_edge * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    crop = config.crop_size
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    array = np.asarray(image, dtype=np.float64)[top : top + crop, left : left + crop]
    array = (array * (1 / 255)).astype(np.float32)
    array = (array - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None]).astype(dtype)
