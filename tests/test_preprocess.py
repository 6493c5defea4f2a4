"""Preprocessing bit-identical to MobileVLM's (expand2square + transformers' CLIPImageProcessor)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mobilevlm_mlc.check.reference import reference_pixels
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.model_defs.config import ImageProcessorConfig
from mobilevlm_mlc.runtime.preprocess import load_image, preprocess


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize(
    "mode,size",
    [
        ("RGB", (480, 320)),
        ("RGB", (200, 640)),
        ("RGB", (336, 336)),
        ("RGBA", (500, 501)),
        ("L", (90, 60)),
        ("P", (1000, 400)),
        ("CMYK", (64, 64)),
        ("RGB", (2, 1)),
        ("I;16", (40, 70)),
    ],
)
def test_matches_mobilevlm_preprocessing(mode, size):
    config = ImageProcessorConfig()
    image = _image(mode, size, seed=sum(size))
    ours = preprocess(image, config)
    ref = reference_pixels(image, config).numpy()
    assert ours.shape == ref.shape == (1, 3, 336, 336)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, ref)


def test_padding_uses_the_mean_colour():
    config = ImageProcessorConfig()
    black_strip = Image.new("RGB", (336, 112), (0, 0, 0))
    pixels = preprocess(black_strip, config)
    pad_value = (np.array([122, 116, 104]) / 255 - np.array(config.image_mean)) / np.array(config.image_std)
    np.testing.assert_allclose(pixels[0, :, 0, 0], pad_value, atol=1e-6)


def test_bad_images_are_clear_errors(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    with pytest.raises(MobileVLMError, match="notes.png: not a readable image"):
        load_image(not_image)
    full = tmp_path / "full.png"
    _image("RGB", (64, 64), 0).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(MobileVLMError, match="truncated.png: not a readable image"):
        load_image(truncated)
    with pytest.raises(MobileVLMError, match="missing.jpg: image not found"):
        load_image(tmp_path / "missing.jpg")
