"""Checkpoint loading: official layouts (bin / safetensors, sharded), validation, and clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilevlm_mlc.check.synthetic import make_checkpoint
from mobilevlm_mlc.convert.checkpoint import CheckpointTensors, load_config
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.errors import MobileVLMError

from .helpers import checkpoint_for


@pytest.fixture
def ckpt(workspace, tmp_path) -> Path:
    """A private copy of the ldpnet checkpoint, free to damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint_for(workspace, "ldpnet"), copy)
    return copy


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_config_is_read_from_the_checkpoint(workspace):
    config = load_config(checkpoint_for(workspace, "ldpnetv2"))
    assert (config.text.hidden_size, config.text.num_hidden_layers, config.text.vocab_size) == (256, 4, 32000)
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.num_layers_used) == (128, 4, 3)
    assert config.projector_type == "ldpnetv2" and config.num_image_tokens == 144


def test_standard_vision_tower_name_means_vit_l_336(ckpt):
    _edit_config(ckpt, mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    vision = load_config(ckpt).vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size) == (
        1024,
        24,
        16,
        336,
    )
    assert vision.num_layers_used == 23


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mm_projector_type": "mlp2x_gelu"}, "unknown mm_projector_type 'mlp2x_gelu'"),
        ({"hidden_size": "big"}, "field 'hidden_size' is 'big', expected int"),
        ({"num_hidden_layers": None}, "missing field 'num_hidden_layers'"),
        ({"mm_vision_tower": "nowhere"}, "mm_vision_tower 'nowhere' is neither"),
        ({"mm_hidden_size": 64}, "mm_hidden_size 64 differs"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ],
)
def test_bad_config_fields(ckpt, change, message):
    _edit_config(ckpt, **change)
    with pytest.raises(MobileVLMError, match="config.json: " + message.replace("(", r"\(")):
        load_config(ckpt)


def test_missing_and_corrupt_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(MobileVLMError, match=r"config.json: not valid JSON"):
        load_config(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(MobileVLMError, match=r"config.json: config.json not found"):
        load_config(ckpt)
    with pytest.raises(MobileVLMError, match="model folder not found"):
        load_config(tmp_path / "absent")


def _tensor_cache(dist: Path) -> dict[str, np.ndarray]:
    import tvm
    from tvm.contrib import tvmjs

    params, _ = tvmjs.load_tensor_cache(str(dist), tvm.cpu())
    return {k: v.numpy() for k, v in params.items()}


def test_sharded_safetensors_converts_like_bin(workspace, tmp_path):
    as_bin = make_checkpoint(tmp_path / "bin", "ldpnetv2", seed=5)
    as_st = make_checkpoint(tmp_path / "st", "ldpnetv2", seed=5, weights_format="safetensors", num_shards=3)
    assert (as_st / "model.safetensors.index.json").is_file()
    a = _tensor_cache(convert(as_bin, tmp_path / "d1", "q0f32", progress=False))
    b = _tensor_cache(convert(as_st, tmp_path / "d2", "q0f32", progress=False))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the fused parameters are the official tensors, concatenated
    tensors = CheckpointTensors(as_bin)
    q, k, v = (tensors.get(f"model.layers.2.self_attn.{p}_proj.weight") for p in "qkv")
    assert np.array_equal(a["model.layers.2.self_attn.qkv_proj.weight"], np.concatenate([q, k, v]))
    fc = tensors.get("model.mm_projector.peg.peg.0.weight")
    assert np.array_equal(a["mm_projector.peg.weight"], fc)


def _rewrite_bin(folder: Path, edit) -> None:
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, folder / "pytorch_model.bin")


def test_missing_unexpected_and_misshapen_tensors(ckpt, tmp_path):
    _rewrite_bin(ckpt, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MobileVLMError, match="the checkpoint lacks 1 tensor: model.layers.1.mlp.up_proj.weight"):
        convert(ckpt, tmp_path / "out", "q0f32", progress=False)
    assert not (tmp_path / "out").exists()

    _rewrite_bin(
        ckpt,
        lambda s: s.update(
            {"model.layers.1.mlp.up_proj.weight": torch.zeros(704, 256), "model.extra.weight": torch.zeros(3)}
        ),
    )
    with pytest.raises(MobileVLMError, match="the checkpoint holds 1 unexpected tensor: model.extra.weight"):
        convert(ckpt, tmp_path / "out", "q0f32", progress=False)

    def misshape(s):
        s.pop("model.extra.weight")
        s["model.norm.weight"] = torch.ones(255)

    _rewrite_bin(ckpt, misshape)
    with pytest.raises(MobileVLMError, match=r"tensor model.norm.weight has shape \[255\], expected \[256\]"):
        convert(ckpt, tmp_path / "out", "q0f32", progress=False)
    assert not (tmp_path / "out").exists()


def test_unused_vision_layers_are_accepted(ckpt, tmp_path):
    """Official checkpoints carry CLIP's last layer and post_layernorm, which layer -2 never uses."""
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.3.") for k in state)
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in state
    dist = convert(ckpt, tmp_path / "out", "q0f32", progress=False)
    names = _tensor_cache(dist).keys()
    assert not any(n.startswith("vision_tower.encoder.layers.3.") or "post_layernorm" in n for n in names)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/mobilevlm-mlc-pwned"),))


def test_pickled_code_never_runs(ckpt, tmp_path):
    marker = Path("/tmp/mobilevlm-mlc-pwned")
    marker.unlink(missing_ok=True)
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Exploit()}, f)
    with pytest.raises(MobileVLMError, match="pytorch_model.bin: cannot read weights"):
        convert(ckpt, tmp_path / "out", "q0f32", progress=False)
    assert not marker.exists()


def test_no_weights_at_all(ckpt, tmp_path):
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(MobileVLMError, match="no weights found"):
        convert(ckpt, tmp_path / "out", "q0f32", progress=False)
