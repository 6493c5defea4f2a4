"""`package` for MLC's Android app: bundle, app config and the merged static library, checked."""

from __future__ import annotations

import json
import subprocess

import pytest

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.package import package

from .helpers import write_config


def test_package_two_models(android_models, tmp_path):
    out = package(write_config(tmp_path, android_models), tmp_path / "out")
    app = json.loads((out / "bundle" / "mlc-app-config.json").read_text())
    names = list(android_models)
    assert [m["model_id"] for m in app["model_list"]] == names
    assert app["model_list"][0]["model_path"] == names[0] and "model_url" in app["model_list"][1]
    assert all(m["estimated_vram_bytes"] > 0 for m in app["model_list"])
    bundled = out / "bundle" / names[0]
    assert (bundled / "mlc-chat-config.json").is_file() and (bundled / "tensor-cache.json").is_file()
    assert not (out / "bundle" / names[1]).exists()
    archive = out / "lib" / "libmodel_android.a"
    symbols = subprocess.run(["nm", "--defined-only", str(archive)], capture_output=True, text=True, check=True).stdout
    for _, _, model_lib in android_models.values():
        assert f" {model_lib}___tvm_ffi__library_bin" in symbols
    members = subprocess.run(["ar", "t", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    assert len(members) == 4  # lib0.o and devc.o of each model, renamed apart


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(device="iphone"), "field 'device' is 'iphone'"),
        (lambda c: c["model_list"][0].update(model_id="../escape"), "model_id '../escape' must be a unique plain name"),
        (lambda c: c["model_list"][0].update(model="nowhere"), "model 'nowhere' is not a dist folder"),
        (lambda c: c["model_list"][0].update(model="HF://mlc-ai/x"), "is on a model hub"),
        (lambda c: c["model_list"][0].update(model_lib="unknown_lib"), "model_lib 'unknown_lib' has no entry"),
        (lambda c: c["model_list"][1].update(model_id=c["model_list"][0]["model_id"]), "must be a unique plain name"),
    ],
)
def test_bad_package_configs(android_models, tmp_path, edit, message):
    path = write_config(tmp_path, android_models)
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(MobileVLMError, match=message.replace("(", r"\(")):
        package(path, tmp_path / "out")
    assert not (tmp_path / "out" / "bundle").exists() and not (tmp_path / "out" / "lib").exists()


def test_library_without_the_named_symbol_is_refused(android_models, tmp_path):
    path = write_config(tmp_path, android_models)
    config = json.loads(path.read_text())
    real = config["model_list"][0]["model_lib"]
    config["model_list"][0]["model_lib"] = "mobilevlm_renamed"
    config["model_lib_path_for_prepare_libs"]["mobilevlm_renamed"] = config["model_lib_path_for_prepare_libs"].pop(real)
    path.write_text(json.dumps(config))
    with pytest.raises(MobileVLMError, match="does not define mobilevlm_renamed___tvm_ffi__library_bin"):
        package(path, tmp_path / "out")
    assert not (tmp_path / "out" / "lib").exists()


def test_cpu_library_is_refused_for_mlcs_app(android_libraries, tmp_path):
    """MLC's Android app runs its engine on Device.opencl(): a CPU .tar would link but never run."""
    cpu = {n: b for n, b in android_libraries.items() if "q4f16_3" in n}
    with pytest.raises(
        MobileVLMError, match=r"holds CPU code only; MLC's Android app creates its engine on Device.opencl\(\)"
    ):
        package(write_config(tmp_path, cpu), tmp_path / "out")


def _config_with(tmp_path, models, **entry):
    path = write_config(tmp_path, models)
    config = json.loads(path.read_text())
    config["model_list"][0].update(entry)
    path.write_text(json.dumps(config))
    return path


def test_overrides_are_written_into_the_bundled_chat_config(android_models, tmp_path):
    overrides = {"context_window_size": 512, "prefill_chunk_size": 256}
    out = package(_config_with(tmp_path, android_models, overrides=overrides), tmp_path / "out")
    name = next(iter(android_models))
    chat = json.loads((out / "bundle" / name / "mlc-chat-config.json").read_text())
    assert {key: chat[key] for key in overrides} == overrides
    original = json.loads((android_models[name][0] / "mlc-chat-config.json").read_text())
    assert original["prefill_chunk_size"] != 256  # the dist itself is untouched


@pytest.mark.parametrize(
    "overrides,bundled,message",
    [
        (
            {"prefill_chunk_size": 128},
            True,
            r"prefill_chunk_size is 128, expected at least 1\d\d: MLC's engine cannot split an image",
        ),
        (
            {"context_window_size": 10**6},
            True,
            r"overrides.context_window_size is 1000000, expected an integer in \[1, \d+\]",
        ),
        ({"sliding_window_size": 64}, True, "overrides.sliding_window_size cannot change a prebuilt library"),
        ({"prefill_chunk_size": "256"}, True, r"overrides.prefill_chunk_size is '256'"),
        ({"prefill_chunk_size": 256}, False, "only a bundled copy can carry"),
        ([], True, r"field 'overrides' is \[\], expected an object"),
    ],
)
def test_bad_overrides_are_refused(android_models, tmp_path, overrides, bundled, message):
    path = _config_with(tmp_path, android_models, overrides=overrides, bundle_weight=bundled)
    with pytest.raises(MobileVLMError, match=message):
        package(path, tmp_path / "out")
    assert not (tmp_path / "out" / "bundle").exists()
