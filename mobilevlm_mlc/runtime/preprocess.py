"""Images into the driver: read safely, converted to RGB bytes. MobileVLM's preprocessing (pad to a
square with the mean colour, CLIP's bicubic resize, centre crop, normalize) runs inside the library
(`model_defs/image_processing.py`), as MLC's engine expects."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from mobilevlm_mlc.errors import MobileVLMError

# Pad-to-square makes a side x side canvas of the longer side: that, not width x height, is what an
# image costs. Bounded by PIL's own decompression-bomb limit (about 9459 x 9459).
MAX_CANVAS_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageTooLarge(MobileVLMError):
    """An image over a size limit (a server answers 413 to it)."""


def check_image_size(size: tuple[int, int], where: object) -> None:
    """Refuse, before anything is decoded or allocated, an image whose padded square would be too large."""
    width, height = size
    if width < 1 or height < 1:
        raise MobileVLMError(f"{where}: image is {width}x{height}, expected at least 1x1 pixels")
    side = max(width, height)
    if side * side > MAX_CANVAS_PIXELS:
        raise ImageTooLarge(
            f"{where}: image is {width}x{height}; padded to a square it would be {side}x{side} = "
            f"{side * side} pixels, more than the {MAX_CANVAS_PIXELS} allowed (scale it down first)"
        )


def load_image(path: Path) -> Image.Image:
    """Open any PIL-readable image file fully (so truncation shows here) and convert it to RGB; its size
    is checked from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise MobileVLMError(f"{path}: image not found")
    try:
        with path.open("rb") as fp:
            return _decode(fp, path)
    except OSError as err:  # unreadable (permissions, a folder's race, I/O)
        raise MobileVLMError(f"{path}: cannot read the image ({err.strerror or err})") from None


def decode_image(data: bytes, where: str, max_pixels: int | None = None) -> Image.Image:
    """`load_image` for bytes in memory (an uploaded image); `max_pixels` bounds width x height."""
    return _decode(io.BytesIO(data), where, max_pixels)


def _decode(fp: BinaryIO, where: object, max_pixels: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
            with Image.open(fp) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{where}: image is {width}x{height}, more than the {max_pixels} pixels allowed"
                    )
                check_image_size(img.size, where)
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"{where}: image too large to decode safely ({err})") from None
    except UnidentifiedImageError:  # its message names the file object (a BytesIO's address for uploads)
        raise MobileVLMError(f"{where}: not a readable image (no image format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MobileVLMError(f"{where}: not a readable image ({err})") from None


def image_bytes(image: Image.Image) -> np.ndarray:
    """RGB bytes [1, H, W, 3]: what the library's `image_embed` takes (it pads, resizes and normalizes)."""
    check_image_size(image.size, "image")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[None])
