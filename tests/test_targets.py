"""Per-target builds of the default model, verified without the hardware: ELF machine, system-lib
symbol, exported entry points and device code inside each artifact."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert import convert
from mobilevlm_mlc.errors import MobileVLMError

from .conftest import checkpoint_for

EM_AARCH64 = 183
ENTRY_POINTS = (b"embed", b"image_embed", b"prefill", b"decode", b"create_tir_paged_kv_cache", b"_metadata")


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF", "not an ELF object"
    return int.from_bytes(data[18:20], "little")


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def dists(workspace):
    ckpt = checkpoint_for(workspace, "ldpnet")
    return {q: convert(ckpt, workspace / f"mobilevlm-tiny-{q}", q, progress=False) for q in ("q4f16_0", "q4f16_1")}


@pytest.mark.parametrize("target,quantization", [("android-adreno", "q4f16_0"), ("android-cpu", "q4f16_1")])
def test_android_static_library(dists, tmp_path, target, quantization):
    out = tmp_path / f"{target}.tar"
    report = compile_model(dists[quantization], target, out)
    prefix = report["system_lib_prefix"]
    assert prefix == f"mobilevlm_tiny_{quantization}_" and len(prefix) >= 8
    objects = members(out)
    assert sorted(objects) == sorted(["lib0.o", f"{prefix}devc.o"])
    for data in objects.values():
        assert elf_machine(data) == EM_AARCH64
    devc = tmp_path / "devc.o"
    devc.write_bytes(objects[f"{prefix}devc.o"])
    symbols = subprocess.run(["nm", str(devc)], capture_output=True, text=True, check=True).stdout
    assert f" R {prefix}__tvm_ffi__library_bin" in symbols
    blob = objects[f"{prefix}devc.o"]
    for name in ENTRY_POINTS:  # the VM bytecode names every exported function
        assert name in blob, name
    if target == "android-adreno":  # OpenCL C source for every kernel, the decode path's among them
        for kernel in ("batch_decode_paged_kv_kernel", "fused_rope_kernel", "rms_norm_kernel", "quantized_matmul_kernel",
                       "quantized_embedding_kernel", "take_last_kernel", "conv2d_kernel", "layer_norm_kernel"):
            assert f"__kernel void {prefix}{kernel}(".encode() in blob, kernel
    else:
        assert b"__kernel" not in blob


def test_vulkan_stops_at_code_generation_with_a_clear_message(dists, tmp_path):
    out = tmp_path / "vulkan.so"
    with pytest.raises(MobileVLMError, match=r"lowering, scheduling and limit checks passed, but this TVM has no 'vulkan' code generator .* USE_VULKAN=ON"):
        compile_model(dists["q4f16_1"], "vulkan", out)
    assert not out.exists()


def test_target_and_quantization_mismatches(dists, tmp_path):
    with pytest.raises(MobileVLMError, match="target 'android-cpu' does not take q4f16_0 weights"):
        compile_model(dists["q4f16_0"], "android-cpu", tmp_path / "x.tar")
    with pytest.raises(MobileVLMError, match=r"target 'android-adreno' writes a '.tar' library"):
        compile_model(dists["q4f16_0"], "android-adreno", tmp_path / "x.so")
    assert not list(tmp_path.iterdir())


def test_targets_command_lists_every_target():
    out = subprocess.run(["mobilevlm-mlc", "targets"], capture_output=True, text=True, check=True).stdout
    for name in ("cpu", "android-cpu", "android-adreno", "cuda", "vulkan"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "no 'vulkan' code generator" in out


def test_cuda_library_holds_every_kernel(dists, tmp_path):
    out = tmp_path / "cuda.so"
    compile_model(dists["q4f16_1"], "cuda", out)
    blob = out.read_bytes()
    assert elf_machine(blob) == 62  # x86-64 host code
    for name in ENTRY_POINTS:
        assert name in blob, name
    for kernel in ("batch_decode_paged_kv_kernel", "fused_rope_kernel", "rms_norm_kernel", "quantized_matmul_kernel",
                   "quantized_embedding_kernel", "conv2d_kernel", "layer_norm_kernel"):
        assert f'extern "C" __global__ void __launch_bounds__'.encode() in blob and f" {kernel}(".encode() in blob, kernel
