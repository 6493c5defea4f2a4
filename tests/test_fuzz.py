"""Fuzzed inputs (hypothesis, bounded): the image loader, `config.json`, `tensor-cache.json` and weight
shards, `mlc-package-config.json` end in a result or a clear error of ours (MobileVLMError) — never
another exception, and never a file outside the output folder."""

from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mobilevlm_mlc.convert.checkpoint import load_config
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.demo import DEMO_IMAGE
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache
from mobilevlm_mlc.package import package
from mobilevlm_mlc.runtime.preprocess import load_image

from .helpers import DELETE, VALUES, apply_edit, checkpoint_for, leaf_paths, write_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def checkpoint(workspace) -> Path:
    return checkpoint_for(workspace, "ldpnet")


@pytest.fixture(scope="module")
def dist(workspace, checkpoint) -> Path:
    return convert(checkpoint, workspace / "fuzz-q4f32_1", "q4f32_1", progress=False)


@pytest.mark.slow  # hundreds of generated inputs, each through the real loader
def test_config_json(checkpoint, tmp_path_factory):
    config = json.loads((checkpoint / "config.json").read_text())

    @FUZZ
    @given(
        st.lists(st.tuples(st.sampled_from(sorted(config)), st.one_of(VALUES, st.just(DELETE))), min_size=1, max_size=3)
    )
    def check(edits):
        folder = tmp_path_factory.mktemp("config")
        edited = dict(config)
        for key, value in edits:
            if value is DELETE:
                edited.pop(key, None)
            else:
                edited[key] = value
        (folder / "config.json").write_text(json.dumps(edited))
        try:
            load_config(folder)
        except MobileVLMError as err:
            assert str(folder) in str(err)

    check()


@pytest.mark.slow  # hundreds of generated inputs, each through the real loader
def test_tensor_cache_json(dist, tmp_path_factory):
    cache = json.loads((dist / "tensor-cache.json").read_text())
    paths = list(leaf_paths(cache))
    shards = [f for f in dist.iterdir() if f.suffix == ".bin"]

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(paths), VALUES), min_size=1, max_size=3))
    def check(edits):
        folder = tmp_path_factory.mktemp("cache")
        for shard in shards:
            (folder / shard.name).symlink_to(shard)
        edited = copy.deepcopy(cache)
        for path, value in edits:
            apply_edit(edited, path, value)
        (folder / "tensor-cache.json").write_text(json.dumps(edited))
        try:
            load_tensor_cache(folder, tvm.cpu())
        except MobileVLMError as err:
            assert str(folder) in str(err)

    check()


@pytest.mark.slow  # hundreds of generated inputs, each through the real loader
def test_weight_shard_bytes(dist, tmp_path_factory):
    shard = next(f for f in sorted(dist.iterdir()) if f.suffix == ".bin")

    @FUZZ
    @given(st.integers(0, shard.stat().st_size - 1), st.integers(1, 255), st.booleans())
    def check(position, xor, truncate):
        folder = tmp_path_factory.mktemp("shard")
        for f in dist.iterdir():
            if f.name != shard.name:
                (folder / f.name).symlink_to(f)
        data = bytearray(shard.read_bytes())
        data[position] ^= xor
        (folder / shard.name).write_bytes(bytes(data[:position] if truncate else data))
        with pytest.raises(MobileVLMError, match=r"(md5 mismatch|truncated or replaced)"):
            load_tensor_cache(folder, tvm.cpu())

    check()


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.open(DEMO_IMAGE).convert("RGB").save(out, "JPEG")
    return out.getvalue()


def test_image_loader(tmp_path_factory):
    bases = [DEMO_IMAGE.read_bytes(), _jpeg()]

    @FUZZ
    @given(
        st.sampled_from(bases),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
        st.integers(0, 10**6),
    )
    def check(base, flips, cut):
        data = bytearray(base[:cut])
        for position, byte in flips:
            if position < len(data):
                data[position] = byte
        path = tmp_path_factory.mktemp("image") / "input.img"
        path.write_bytes(bytes(data))
        try:
            assert load_image(path).mode == "RGB"
        except MobileVLMError as err:
            assert str(path) in str(err)

    check()


def test_decompression_bomb_is_refused(tmp_path):
    """A 60000x60000 PNG header over a few bytes of data: refused before decoding (found by fuzzing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    with pytest.raises(
        MobileVLMError, match=r"bomb.png: image too large to decode safely \(Image size \(3600000000 pixels\)"
    ):
        load_image(path)


def test_package_config(android_models, tmp_path_factory):
    """Fuzzed mlc-package-config.json: the package or a clear error, and nothing written outside OUT."""
    base = json.loads(write_config(tmp_path_factory.mktemp("pkgcfg"), android_models).read_text())
    paths = list(leaf_paths(base))
    strings = st.sampled_from(
        ["", "..", "../escape", "/abs/path", "a/b", "HF://x/y", "mobilevlm_x", "android", "iphone"]
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.lists(st.tuples(st.sampled_from(paths), st.one_of(VALUES, strings, st.just(DELETE))), min_size=1, max_size=3)
    )
    def check(edits):
        folder = tmp_path_factory.mktemp("pkg")
        edited = copy.deepcopy(base)
        for path, value in edits:
            apply_edit(edited, path, value)
        config = folder / "mlc-package-config.json"
        config.write_text(json.dumps(edited))
        try:
            package(config, folder / "out")
        except MobileVLMError as err:
            assert "mlc-package-config.json" in str(err) or "ar" in str(err)
        assert sorted(p.name for p in folder.iterdir()) in (
            ["mlc-package-config.json"],
            ["mlc-package-config.json", "out"],
        )

    check()


@pytest.mark.parametrize(
    "blob,message",
    [
        (struct.pack("<Q", 2**62) + b"{}", "header too large"),
        (struct.pack("<Q", 1000) + b"{}", "invalid header length"),
        (struct.pack("<Q", 4) + b"abcd", "invalid JSON in header"),
        (
            (lambda h: struct.pack("<Q", len(h)) + h)(
                json.dumps(
                    {"x": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}}
                ).encode()
            ),
            "incomplete metadata",
        ),
    ],
)
def test_safetensors_header_is_validated_before_allocation(checkpoint, tmp_path, blob, message):
    """A hostile header (absurd length, offsets past the file, a 4 TB tensor) is refused by name, with
    nothing allocated for it: the header is bounded and checked against the file size first."""
    from mobilevlm_mlc.convert.checkpoint import CheckpointTensors

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(blob)
    with pytest.raises(MobileVLMError, match=rf"model.safetensors: cannot read weights \(SafetensorError: .*{message}"):
        CheckpointTensors(folder).get("x")
