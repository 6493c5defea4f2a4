"""Arm CPU code executed here, under qemu-user on a named CPU model (QEMU's cortex-a76: Armv8.2 with
dotprod and fp16, as the Cortex-A78 default): the int8 `sdot` kernels against the emulation of their
rounding, the whole `arm64-linux` model against the PyTorch reference, `verify --target arm64-linux` as a
user runs it, `check-kernels --target android-cpu`, and `bench` on an emulated device behind a tracker. One emulated device serves the tests that take
`arm_session` (the emulated `import tvm` costs 20-60 s)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.support import cc

from mobilevlm_mlc.check.kernel_check import check_kernels
from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.emulation import emulated_device
from mobilevlm_mlc.emulation.device import free_port
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.targets import get_target
from mobilevlm_mlc.targets.cpu_kernels.int8_dot import NEON_DOTPROD

from .helpers import checkpoint_for, cli, stop_group
from .test_cpu_kernels import INT8_CASES, check_int8_result, dot_target, int8_case, int8_kernel
from .test_quantization import _check_against_fake_quantized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arm_build(workspace) -> tuple[Path, Path, dict]:
    """The default model at q4f16_3 compiled for arm64-linux (its default --cpu): (dist, library, report)."""
    dist = convert(checkpoint_for(workspace, "ldpnet"), workspace / "ldpnet-q4f16_3-arm", "q4f16_3", progress=False)
    lib = workspace / "ldpnet-q4f16_3-arm64.so"
    return dist, lib, compile_model(dist, "arm64-linux", lib)


@pytest.fixture(scope="module")
def arm_session():
    """A session on an emulated arm64-linux device (its default --cpu, cortex-a78: QEMU cortex-a76), one
    per module: TVM's RPC server serves one session at a time, so a second one would wait for the first."""
    with emulated_device(get_target("arm64-linux")) as device:
        yield device.session()


# each path of the int8 kernels once: skinny (batch decode), the unpacked-tile GEMM (prefill), the GEMV
ARM_CASES = [
    case for case in INT8_CASES if case in (("gemm", 3, "float32"), ("gemm", 13, "float16"), ("gemv", 1, "float16"))
]


def test_int8_kernels_run_on_arm(arm_session):
    """The int8 kernels of the x86 test, built for the Cortex-A78 (`sdot`), run on the emulated Armv8.2
    CPU: equal to the emulation of their rounding, as the x86 kernels are."""
    session = arm_session
    kernels = {
        f"{kernel}_{rows}_{dtype}": int8_kernel(kernel, rows, dtype, NEON_DOTPROD) for kernel, rows, dtype in INT8_CASES
    }
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in kernels.items()})
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "int8.so"
        tvm.compile(mod, target=dot_target(NEON_DOTPROD)).export_library(
            str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++")
        )
        lib = session.load_library(path)
    device = session.device("cpu")
    for kernel, rows, dtype in ARM_CASES:
        (x, q_weight, q_scale), emulated, exact = int8_case(kernel, rows, dtype)
        out = tvm.runtime.tensor(np.zeros((1, rows, 192), dtype), device)
        lib[f"{kernel}_{rows}_{dtype}"](*[tvm.runtime.tensor(a, device) for a in (x, q_weight, q_scale)], out)
        check_int8_result(out.numpy(), emulated, exact, dtype)


def test_arm64_linux_model_matches_the_reference(arm_session, arm_build, workspace):
    """The default model's `arm64-linux` q4f16_3 library (int8 `sdot` matmuls, fp16 arithmetic) run on
    the emulated device against the reference with the same weights and the same int8 rounding."""
    dist, lib, report = arm_build
    assert report["build"] | {"tvm": None} == {
        "target": "arm64-linux",
        "tvm": None,
        "quantized_matmul_activations": "int8",
        "int8_dot_product": "neon-dotprod",
        "vision_compute_dtype": "float16",
        "kv_cache_dtype": "float16",
        "cpu": "cortex-a78",
        "mcpu": "cortex-a78",
    }
    engine = Engine(dist, lib, remote=arm_session)
    assert engine.int8_activations
    _check_against_fake_quantized(engine, workspace, "q4f16_3")


def test_verify_arm64_linux_from_the_command_line(workspace):
    """`verify --target arm64-linux` as a user runs it (q0f32: fp32 tolerances, 16 greedy tokens equal)."""
    ckpt = checkpoint_for(workspace, "ldpnet")
    proc = subprocess.run(
        [sys.executable, "-m", "mobilevlm_mlc.cli", "verify", str(ckpt), "--target", "arm64-linux"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "emulated AArch64 RPC server up (qemu-aarch64 -cpu cortex-a76)" in proc.stderr
    lines = proc.stdout.splitlines()
    assert "greedy tokens: 16/16 leading tokens agree  ok" in lines and lines[-1] == "PASS"
    for boundary in ("pixels", "vision features", "projector output", "first-token logits"):
        [row] = [line for line in lines if line.startswith(boundary)]
        assert row.endswith("ok") and ("0e+00" in row if boundary == "pixels" else "1e-04" in row), row


def test_check_kernels_android_cpu(workspace):
    """The android-cpu build's decode kernels (the int8 `sdot` GEMVs, norms, the KV cache's attention and
    append), compiled for glibc with the same flags, run under emulation against this host's CPU build:
    all matched, or skipped with a reason. (`image_embed`'s kernels run whole in the `verify` test; the
    CLI checks both entries by default.)"""
    dist = convert(checkpoint_for(workspace, "ldpnet"), workspace / "ldpnet-q4f16_3-kc", "q4f16_3", progress=False)
    results = check_kernels(dist, "android-cpu", entries=("decode",))
    by_status = {s: [r for r in results if r.status == s] for s in ("ok", "MISMATCH", "skipped")}
    assert not by_status["MISMATCH"], [(r.name, r.max_rel_error) for r in by_status["MISMATCH"]]
    assert all(r.detail for r in by_status["skipped"])
    names = {r.name for r in by_status["ok"]}
    assert {"batch_decode_paged_kv", "fused_rope", "tir_kv_cache_transpose_append"} <= names  # through renames
    assert sum(name.startswith("quantized_matmul") for name in names) == 5  # qkv, o, gate/up, down, logits
    assert len(by_status["ok"]) >= 0.8 * len(results)


def test_bench_an_emulated_device_through_a_tracker(arm_build, ldpnet_built, tmp_path):
    """The path a phone takes: `emulate` registers an emulated device with a TVM RPC tracker, `bench
    --rpc-tracker` runs the arm64-linux library there, and `compare` puts it beside this host's build.
    The emulated figures mean nothing; the test checks that they are real runs, labelled as remote."""
    dist, lib, _ = arm_build
    port = free_port()
    tracker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    emulate = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mobilevlm_mlc.cli",
            "emulate",
            "--rpc-tracker",
            f"127.0.0.1:{port}",
            "--rpc-key",
            "arm64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        announced = emulate.stdout.readline()  # printed once the emulated server listens
        assert "registered with 127.0.0.1:" in announced and "'arm64'" in announced, emulate.stderr.read()
        settings = ["--prompt-lengths", "4", "--decode-tokens", "2", "--repeat", "1", "--warmup", "0"]
        remote = tmp_path / "arm.json"
        proc = cli(
            "bench", dist, "--lib", lib, *settings, "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "arm64",
            "--label", "arm64-linux (emulated)", "-o", remote,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        local = tmp_path / "host.json"
        proc = cli("bench", ldpnet_built.dist, "--lib", ldpnet_built.lib, *settings, "--label", "host", "-o", local)
        assert proc.returncode == 0, proc.stderr
    finally:
        emulate.terminate()
        emulate.wait(timeout=60)
        stop_group(tracker)
    result = json.loads(remote.read_text())
    assert result["environment"]["rpc_key"] == "arm64" and result["environment"]["cpu"] is None
    assert result["build"]["int8_dot_product"] == "neon-dotprod" and result["decode_tok_s"]["median"] > 0
    compared = cli("compare", remote, local)
    assert compared.returncode == 0, compared.stderr
    assert "RPC device 'arm64' via 127.0.0.1:" in compared.stdout and "arm64-linux (emulated)" in compared.stdout
    assert emulate.returncode in (143, -15)  # SIGTERM ended it, its emulated server with it
