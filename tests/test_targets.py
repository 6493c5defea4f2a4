"""Per-target builds of the default model, verified without the hardware: ELF machine, system-lib
symbol, exported entry points and device code inside each artifact."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tvm
from tvm import tirx
from tvm.script import tirx as T

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.formats.library import inspect_library
from mobilevlm_mlc.formats.mlc_contract import GPU_SAMPLER_FUNCTIONS, TIR_FUNCTIONS, VM_FUNCTIONS
from mobilevlm_mlc.targets import get_target
from mobilevlm_mlc.targets.passes.verify_gpu_kernels import inconsistent_thread_extents
from mobilevlm_mlc.targets.toolchain.cuda_images import (
    FATBIN_MAGIC,
    PTX_ISA_RELEASES,
    CudaImage,
    CudaImageError,
    cubin_image,
    driver_problems,
    fatbin_images,
    release_key,
    release_of,
)

from .helpers import checkpoint_for

ROOT = Path(__file__).resolve().parent.parent
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
    return {
        q: convert(ckpt, workspace / f"mobilevlm-tiny-{q}", q, progress=False)
        for q in ("q4f16_0", "q4f16_1", "q4f16_3")
    }


@pytest.mark.parametrize(
    "name,target,prefix",
    [
        ("mobilevlm-ldpnet-q4f16_0", "android-adreno", "mobilevlm_ldpnet_q4f16_0_"),
        ("mobilevlm-ldpnetv2-q4f16_3", "android-cpu", "mobilevlm_ldpnetv2_q4f16_3_"),
    ],
)
def test_android_static_library(android_libraries, tmp_path, name, target, prefix):
    _, out, model_lib = android_libraries[name]  # built for `target` (the packaging tests bundle the OpenCL ones)
    assert model_lib + "_" == prefix  # the dist folder's name as a C identifier
    objects = members(out)
    assert sorted(objects) == sorted(["lib0.o", f"{prefix}devc.o"])
    for data in objects.values():
        assert elf_machine(data) == EM_AARCH64
    devc = tmp_path / "devc.o"
    devc.write_bytes(objects[f"{prefix}devc.o"])
    symbols = subprocess.run(["nm", str(devc)], capture_output=True, text=True, check=True).stdout
    assert f" R {prefix}__tvm_ffi__library_bin" in symbols
    blob = objects[f"{prefix}devc.o"]
    for entry in ENTRY_POINTS:  # the VM bytecode names every exported function
        assert entry in blob, entry
    contract = inspect_library(out)  # MLC's functions, read from the VM bytecode and the objects
    assert set(VM_FUNCTIONS) <= set(contract.vm_functions) and set(TIR_FUNCTIONS) <= contract.host_functions
    assert contract.contract_problems == [] and contract.runtime_problems == []  # MLC's engine and mlc4j's runtime
    if target == "android-adreno":  # OpenCL C source for every kernel, the decode path's among them
        for kernel in (
            "batch_decode_paged_kv_kernel",
            "fused_rope_kernel",
            "rms_norm_kernel",
            "quantized_matmul_kernel",
            "quantized_embedding_kernel",
            "take_last_kernel",
            "conv2d_kernel",
            "layer_norm_kernel",
        ):
            assert f"__kernel void {prefix}{kernel}(".encode() in blob, kernel
    else:
        assert b"__kernel" not in blob


def test_vulkan_stops_at_code_generation_with_a_clear_message(dists, tmp_path):
    out = tmp_path / "vulkan.so"
    with pytest.raises(
        MobileVLMError,
        match=r"lowering, scheduling and limit checks passed, but this TVM has no 'vulkan' code generator .* USE_VULKAN=ON",
    ):
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
    for name in ("cpu", "android-cpu", "android-adreno", "arm64-linux", "orin-cuda", "cuda", "vulkan"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "no 'vulkan' code generator" in out
    # the Arm targets' --cpu presets, each with the QEMU model its code runs on here
    assert "--cpu rpi5        cortex-a76: Raspberry Pi 5 (Cortex-A76), emulated on qemu -cpu cortex-a76" in out
    assert "--cpu graviton3   neoverse-v1: AWS Graviton3" in out and "emulated on qemu -cpu max" in out


DECODE_KERNELS = (
    "batch_decode_paged_kv_kernel",
    "fused_rope_kernel",
    "rms_norm_kernel",
    "quantized_embedding_kernel",
    "tir_kv_cache_transpose_append_kernel",
)


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"V([\d.]+)", out).group(1)


CUDA_BUILDS = {
    # target: (ELF machine, module format, SASS archs, PTX arch, compiler, toolkit version); NVRTC 12's
    # cubin names no release (ELF ABI 7, no .note.nv.tkinfo), CUDA 13's fatbin images do
    "cuda": ("x86-64", "fatbin", ["sm_80", "sm_90"], "compute_90", "nvcc", nvcc_version),
    "orin-cuda": (
        "AArch64",
        "cubin",
        ["sm_87"],
        None,
        "nvrtc",
        lambda: importlib.metadata.version("nvidia-cuda-nvrtc-cu12"),
    ),
}


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """benchmarks/gpu_check.sh run here (SIZES=tiny: the 1.7B build is the same code at ~3 minutes): the
    finished process, its output folder and its work folder (the default model's q4f16_1 dist and its
    `cuda` library)."""
    root = tmp_path_factory.mktemp("gpu-check")
    env = os.environ | {"SIZES": "tiny", "PYTHON": sys.executable, "WORK": str(root / "work")}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(root / "out")], capture_output=True, text=True, env=env
    )
    return proc, root / "out", root / "work"


@pytest.fixture(scope="module")
def cuda_libraries(gpu_check, tmp_path_factory):
    """Both CUDA targets' libraries of one dist: the script's `cuda` build, and `orin-cuda` from its dist."""
    _, _, work = gpu_check
    out = tmp_path_factory.mktemp("cuda")
    (out / "cuda.so").symlink_to(work / "tiny-q4f16_1-cuda.so")
    compile_model(work / "tiny-q4f16_1", "orin-cuda", out / "orin-cuda.so")
    return out


def nvcc_ptx_isa(tmp_path: Path) -> tuple[int, int]:
    """The PTX ISA version this host's nvcc writes, from the `.version` line of a PTX file it emits (the
    library's PTX is compressed in its fatbin, so its header's version is checked against this)."""
    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }')
    subprocess.run(["nvcc", "-ptx", "-arch=compute_90", "-o", str(tmp_path / "k.ptx"), str(src)], check=True)
    major, minor = re.search(r"^\.version (\d+)\.(\d+)", (tmp_path / "k.ptx").read_text(), re.M).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("target", list(CUDA_BUILDS))
def test_cuda_libraries_embed_compiled_device_code(cuda_libraries, target, tmp_path):
    machine, fmt, archs, ptx, compiler, toolkit = CUDA_BUILDS[target]
    out = cuda_libraries / f"{target}.so"
    report = inspect_library(out)
    assert report.machines == [machine]
    assert report.system_lib_prefix is None
    assert report.metadata["build"] == {
        "target": target,
        "tvm": tvm.__version__,
        "device_code": fmt,
        "cuda_archs": archs,
        "ptx": ptx,
        "cuda_toolkit": toolkit(),
        "cuda_compiler": compiler,
        "kv_cache_dtype": "float16",
    }
    [device] = report.device_modules
    assert (device.kind, device.format) == ("cuda", fmt)
    built_by = release_of(toolkit())
    expected = [CudaImage("sass", a, built_by if compiler == "nvcc" else None) for a in archs]
    if ptx:  # the fatbin's PTX has the ISA version nvcc writes, which maps to the toolkit's release
        expected.append(CudaImage("ptx", ptx, PTX_ISA_RELEASES[nvcc_ptx_isa(tmp_path)]))
    assert sorted(device.images, key=str) == sorted(expected, key=str)
    assert report.oldest_cuda_driver == built_by
    for kernel in DECODE_KERNELS + ("conv2d_kernel", "layer_norm_kernel"):
        assert kernel in device.kernels, kernel
    assert any(k.startswith("fused_quantized_matmul") for k in device.kernels)
    assert set(VM_FUNCTIONS) <= set(report.vm_functions) and set(TIR_FUNCTIONS) <= report.host_functions
    assert {name: report.vm_functions.get(name) for name in GPU_SAMPLER_FUNCTIONS} == GPU_SAMPLER_FUNCTIONS
    assert report.contract_problems == []  # MLC's engine samples on a CUDA device: the GPU sampler is there
    for kernel in ("argsort", "gpu_2d_continuous_cumsum", "sampler_take_probs", "renormalize_by_top_p"):
        assert any(k.startswith(kernel) for k in device.kernels), kernel
    blob = out.read_bytes()
    assert b'extern "C" __global__' not in blob  # no CUDA C left to compile on the device
    for name in ENTRY_POINTS:
        assert name in blob, name
    if target == "orin-cuda":  # a shared object for Jetson's Linux, linked by the cross toolchain
        assert blob[16:18] == (3).to_bytes(2, "little")  # ET_DYN


def test_orin_device_code_loads_on_jetpack_6_and_the_desktop_one_does_not(cuda_libraries):
    """What each target's driver accepts, decided from the images alone: Orin's cubin (NVRTC 12.2) loads on
    JetPack 6.0's CUDA 12.2 driver; the desktop fatbin (this host's nvcc) holds no sm_87 SASS and needs its
    own toolkit's driver, so the same check refuses it for Orin."""
    orin = inspect_library(cuda_libraries / "orin-cuda.so").device_modules[0].images
    desktop = inspect_library(cuda_libraries / "cuda.so").device_modules[0].images
    jetpack = get_target("orin-cuda").device_code
    assert (jetpack.archs, jetpack.driver) == (("sm_87",), "12.2")
    assert driver_problems(orin, jetpack.archs, jetpack.driver) == []
    problems = driver_problems(desktop, jetpack.archs, jetpack.driver)
    assert problems[0] == "SASS for sm_80, sm_90, expected sm_87"
    assert "PTX for compute_90, expected compute_87 or none" in problems
    host = release_of(nvcc_version())
    if release_key(host) > (12, 2):
        assert f"sass sm_80 (CUDA {host}) needs a CUDA {host} driver; the target's is CUDA 12.2" in problems
    assert driver_problems(desktop, ("sm_80", "sm_90"), None) == []


def test_cuda_build_names_a_missing_toolkit(dists, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    out = tmp_path / "cuda.so"
    with pytest.raises(MobileVLMError, match=r"target 'cuda': no nvcc found \(looked in CUDA_HOME=.*no-cuda\)"):
        compile_model(dists["q4f16_1"], "cuda", out)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".cuda*"))


def test_orin_build_names_the_missing_cuda_12_compiler(dists, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.cuda_nvrtc", None)  # as if nvidia-cuda-nvrtc-cu12 were absent
    with pytest.raises(
        MobileVLMError,
        match=r"^target 'orin-cuda': no nvidia-cuda-nvrtc-cu12 installed \(the CUDA 12 compiler from PyPI\); "
        r"pip install 'mobilevlm-mlc\[jetson\]'$",
    ):
        compile_model(dists["q4f16_1"], "orin-cuda", tmp_path / "orin.so")
    assert not list(tmp_path.iterdir())


def test_nvrtc_leaves_the_threads_text_encoding_as_it_was():
    """NVRTC 12.2 switches the calling thread to the C locale; found when, after an `orin-cuda` build in
    the same process, Python decoded a subprocess's UTF-8 output as ASCII. The compiler puts it back."""
    import locale

    from mobilevlm_mlc.targets.toolchain.nvrtc import Nvrtc

    before = locale.getpreferredencoding(False)
    cubin = Nvrtc.find().compile('extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }', "sm_87", [])
    assert cubin[:4] == b"\x7fELF" and locale.getpreferredencoding(False) == before


def test_adreno_kernels_unroll_within_the_cap(dists):
    from mobilevlm_mlc.check.kernel_check import scheduled_kernels
    from mobilevlm_mlc.formats.dist import load_dist
    from mobilevlm_mlc.targets.android import ADRENO_MAX_UNROLL_STEP

    dist = load_dist(dists["q4f16_0"])
    _, mod = scheduled_kernels(dist.config, dist.quantization.scheme, get_target("android-adreno"))
    steps, explicit = set(), set()
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            text = func.script()
            steps |= {int(v) for v in re.findall(r'"pragma_auto_unroll_max_step": (\d+)', text)}
            explicit |= {int(v) for v in re.findall(r'"pragma_unroll_explicit": (\d+)', text)}
    assert steps and max(steps) <= ADRENO_MAX_UNROLL_STEP
    assert explicit == {0}


def test_inconsistent_thread_binding_is_detected():
    """dlight's GEMV rule binds LDP's gate epilogue to 32 x-threads inside a 2-thread kernel; the
    check catches such kernels (our pipeline reschedules them)."""

    @T.prim_func(s_tir=True)
    def bad(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for bx in T.thread_binding(2, thread="blockIdx.x"):
            for tx in T.thread_binding(2, thread="threadIdx.x"):
                with T.sblock("x"):
                    v = T.axis.spatial(64, bx * 32 + tx)
                    b[v] = a[v]
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("y"):
                    v = T.axis.spatial(64, bx * 32 + tx)
                    b[v] = a[v] * T.float32(2)

    assert inconsistent_thread_extents(bad) == "threadIdx.x bound with extents 2 and 32"


def test_check_kernels_on_pocl(dists, tmp_path):
    """The Adreno build's decode and vision kernels, run by PoCL, match the CPU build's kernels."""
    report = tmp_path / "kernels.json"
    proc = subprocess.run(
        ["mobilevlm-mlc", "check-kernels", str(dists["q4f16_0"]), "--output-json", str(report)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["name"]: r for r in json.loads(report.read_text())}
    se_gates = [n for n in results if re.search(r"_tir_clip\d*_divide\d*_multiply\d+$", n)]  # LDP's squeeze-excitation
    assert se_gates
    # NT_matmul: the patch embedding; numbered variants (rms_norm1, ...) are the same kernel at another shape
    for base in (
        "batch_decode_paged_kv",
        "fused_rope",
        "rms_norm",
        "tir_kv_cache_transpose_append",
        "softmax",
        "NT_matmul",
        "layer_norm",
    ):
        names = [n for n in results if re.fullmatch(rf"{base}\d*", n)]
        assert names, base
        for name in names:
            assert results[name]["status"] == "ok", results[name]
            assert results[name]["launches"] >= 1 and results[name]["max_rel_error"] <= 1e-4
    for name in se_gates:
        assert results[name]["status"] == "ok" and results[name]["max_rel_error"] <= 1e-4, results[name]
    quantized = [r for n, r in results.items() if "quantized_matmul" in n]
    assert len(quantized) >= 4 and all(r["status"] == "ok" for r in quantized)
    assert not [r for r in results.values() if r["status"] == "MISMATCH"]
    assert sum(r["status"] == "ok" for r in results.values()) >= 40
    assert "0 mismatched" in proc.stdout


def test_inspect_rejects_a_file_that_is_not_a_library(tmp_path):
    path = tmp_path / "model.so"
    path.write_bytes(b"not a library")
    proc = subprocess.run(["mobilevlm-mlc", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}: not a library built by mobilevlm-mlc compile (not a 64-bit ELF object)" in proc.stderr


def test_gpu_check_script_builds_then_stops_without_a_gpu(gpu_check):
    """On this GPU-less machine the script makes the checkpoint, builds and inspects the `cuda` library,
    then stops with one line saying why, exit status 2."""
    proc, out, work = gpu_check
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.rstrip()
        .splitlines()[-1]
        .endswith("stopping: no NVIDIA GPU on this machine (TVM's cuda(0) does not exist); verify and bench need one")
    )
    report = json.loads((out / "inspect-tiny.json").read_text())
    assert report["build"]["target"] == "cuda" and report["mlc_contract"]["missing"] == []
    assert report["oldest_cuda_driver"] == release_of(nvcc_version())
    assert (work / "tiny-q4f16_1-cuda.so").is_file()


def test_corrupt_fatbins_are_refused_not_looped_over():
    header = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, 64)
    for data, fragment in (
        (header[:10], "shorter than its header"),
        (header + bytes(20), "truncated"),
        (header + struct.pack("<HHIQ", 2, 0, 0, 0) + bytes(48), "out of bounds"),  # a zero-size entry
        (header + struct.pack("<HHIQ", 2, 0, 64, 1 << 40) + bytes(48), "out of bounds"),
    ):
        with pytest.raises(CudaImageError, match=fragment):
            fatbin_images(data)
    with pytest.raises(CudaImageError, match="not a 64-bit ELF cubin"):
        cubin_image(b"\x7fELF")
