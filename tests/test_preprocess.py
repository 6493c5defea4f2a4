"""The library's image preprocessing against MobileVLM's (expand2square + transformers' CLIPImageProcessor)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from PIL import Image

from mobilevlm_mlc.check.reference import reference_pixels
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.model_defs.config import ImageProcessorConfig
from mobilevlm_mlc.model_defs.image_processing import normalization_table, preprocess_image
from mobilevlm_mlc.runtime.preprocess import load_image


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize(
    "mode,size",
    [
        ("RGB", (336, 336)),
        ("RGB", (336, 112)),
        ("RGBA", (112, 336)),
        ("L", (2, 1)),
        ("RGB", (480, 320)),
        ("RGB", (200, 640)),
        ("RGBA", (500, 501)),
        ("L", (90, 60)),
        ("P", (1000, 400)),
        ("CMYK", (64, 64)),
        ("I;16", (40, 70)),
        ("RGB", (1600, 1200)),
    ],
)
def test_library_preprocessing_matches_mobilevlm(ldpnet_engine, mode, size):
    """The library's in-graph pad + resize + normalize of the raw bytes against MobileVLM's (expand2square,
    then transformers' CLIPImageProcessor with PIL's bicubic): bit-identical at every size (a CPU build
    computes the resampler's coefficients in float64, as PIL does)."""
    image = _image(mode, size, seed=sum(size))
    pixels = ldpnet_engine.pixels(image)
    assert pixels.shape == (1, size[1], size[0], 3) and pixels.dtype == np.uint8
    ours = ldpnet_engine.preprocess_image(pixels)
    ref = reference_pixels(image, ImageProcessorConfig()).numpy()
    assert ours.shape == ref.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    assert np.array_equal(ours, ref)


@pytest.fixture(scope="module")
def float32_preprocess():
    """The preprocessing alone with float32 coefficients, as GPUs without fp64 build it, on this CPU."""
    from tvm.relax.frontend import nn

    from mobilevlm_mlc.targets.cpu import cpu_pipeline

    class Preprocess(nn.Module):
        def run(self, image):
            return preprocess_image(image, ImageProcessorConfig(), "float32")

    spec = {
        "run": {"image": nn.spec.Tensor([1, "h", "w", 3], "uint8"), "$": {"param_mode": "none", "effect_mode": "none"}}
    }
    mod, _ = Preprocess().export_tvm(spec=spec)
    target = tvm.target.Target.from_device(tvm.cpu())
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
    return lambda rgb: vm["run"](tvm.runtime.tensor(rgb)).numpy()


@pytest.mark.parametrize("size", [(336, 336), (336, 112), (480, 320), (200, 640), (90, 60), (1000, 400), (1600, 1200)])
def test_float32_coefficients_stay_within_one_level(float32_preprocess, size):
    """Float32 coefficients move one of PIL's 2^-22 fixed-point steps now and then: a byte one level off
    on at most 0.1% of the values (measured up to 0.07%); a square of the output size is exact."""
    config = ImageProcessorConfig()
    image = _image("RGB", size, seed=sum(size))
    ours = float32_preprocess(np.asarray(image)[None])
    ref = reference_pixels(image, config).numpy()
    levels = np.abs(ours - ref) * np.asarray(config.image_std)[:, None, None] * 255
    assert levels.max() < 1.001 and np.mean(levels > 0.01) < 1e-3
    if max(size) == 336:
        assert np.array_equal(ours, ref)


def test_padding_uses_the_mean_colour(ldpnet_engine):
    config = ImageProcessorConfig()
    black_strip = Image.new("RGB", (336, 112), (0, 0, 0))
    pixels = ldpnet_engine.preprocess_image(ldpnet_engine.pixels(black_strip))
    pad_value = (np.array([122, 116, 104]) / 255 - np.array(config.image_mean)) / np.array(config.image_std)
    np.testing.assert_allclose(pixels[0, :, 0, 0], pad_value, atol=1e-6)
    np.testing.assert_allclose(
        pixels[0, :, 200, 0], -np.array(config.image_mean) / np.array(config.image_std), atol=1e-6
    )


def test_normalization_table_is_transformers_float32_arithmetic():
    """The table the last kernel looks bytes up in holds exactly the values transformers computes."""
    config = ImageProcessorConfig()
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(336, axis=0)
    ramp = np.concatenate([ramp, ramp[:, :80]], axis=1)  # 336 x 336: not resampled, every byte present
    ref = reference_pixels(Image.fromarray(ramp), config).numpy()[0]
    table = normalization_table(config)
    for channel in range(3):
        assert np.array_equal(ref[channel, 0, :256], table[channel])


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
