"""`bench`, `compare`, benchmarks through a TVM RPC tracker, and the peers script — on the default model.
Timings are never asserted (noisy machines): the tests check what is measured, recorded and computed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mobilevlm_mlc.bench.benchmark import VECTOR_FEATURES
from mobilevlm_mlc.demo import DEMO_PROMPT
from mobilevlm_mlc.formats.dist import TOKENIZER_MODEL, load_dist
from mobilevlm_mlc.formats.library import inspect_library
from mobilevlm_mlc.runtime.backend import connect
from mobilevlm_mlc.runtime.conversation import IMAGE_TOKEN_ID, Conversation, tokenize_with_images
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig
from mobilevlm_mlc.runtime.tokenizer import Tokenizer

from .helpers import cli, cli_error, stop_group

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--prompt-lengths", "8,16", "--decode-tokens", "4", "--repeat", "1", "--threads", "2"]


def _spread_ok(figure: dict) -> bool:
    return 0 < figure["min"] <= figure["median"] <= figure["max"]


def test_bench_decodes_a_batch(ldpnet_built, tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench", ldpnet_built.dist, "--lib", ldpnet_built.lib, *FAST, "--batch", "6", "-o", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["batch"] == 6 and _spread_ok(result["decode_tok_s"])


def test_bench_writes_every_figure_and_the_environment(ldpnet_built, tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench", ldpnet_built.dist, "--lib", ldpnet_built.lib, *FAST, "-o", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "mobilevlm-mlc-bench/1" and result["engine"] == "mobilevlm-mlc"
    assert (result["target"], result["quantization"]) == ("cpu", "q0f32")
    assert result["label"] == "mobilevlm-mlc cpu q0f32"
    env = result["environment"]
    assert env["threads"] == 2 and env["cores"] >= 1 and env["cpu"] and env["tvm"] == "0.27.0.post1"
    flags = next(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))
    )
    assert env["cpu_features"] == [f for f in VECTOR_FEATURES if f in flags.split(":", 1)[1].split()]
    assert result["build"] == inspect_library(ldpnet_built.lib).metadata["build"]  # q0f32: no int8 kernels
    assert result["build"]["int8_dot_product"] is None
    assert len(env["git_commit"] or "0" * 40) == 40
    assert result["model_config"]["projector_type"] == "ldpnet"
    assert result["settings"] == {
        "prompt_lengths": [8, 16],
        "decode_tokens": 4,
        "repeat": 1,
        "warmup": 1,
        "threads": 2,
        "batch": 1,
        "image_tokens": 144,
    }
    assert sorted(result["prefill_tok_s"]) == ["16", "8"]
    # TTFT prefills the demo prompt's chat turn with its image (it once took the prefill runs' tensors)
    turn = Conversation(template=dict(load_dist(ldpnet_built.dist).chat_config["conv_template"]))
    ids = tokenize_with_images(
        Tokenizer(ldpnet_built.dist / TOKENIZER_MODEL), turn.user_turn(DEMO_PROMPT, with_image=True), add_bos=True
    )
    assert result["ttft_tokens"] == len(ids) - 1 + 144 < 144 + 64  # the placeholder becomes 144 image rows
    for figure in [
        result["image_encode_ms"],
        result["decode_tok_s"],
        result["ttft_ms"],
        *result["prefill_tok_s"].values(),
    ]:
        assert _spread_ok(figure), figure
    assert result["peak_rss_mib"] > 50
    assert "decode" in proc.stdout and "tok/s" in proc.stdout


def test_bench_refuses_prompts_beyond_the_context_window(ldpnet_built, tmp_path):
    proc = cli(
        "bench", ldpnet_built.dist, "--lib", ldpnet_built.lib, "--prompt-lengths", "4000", "-o", tmp_path / "x.json"
    )
    assert proc.returncode == 2
    assert (
        "144 image tokens + a 4000-token prompt + 128 decoded tokens = 4272 exceeds the context window (2048)"
        in cli_error(proc)
    )
    assert not (tmp_path / "x.json").exists()


def _result(label: str, decode: float, prefill: float, encode: float | None) -> dict:
    fig = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    result = {
        "schema": "mobilevlm-mlc-bench/1",
        "label": label,
        "environment": {"cpu": "test cpu", "threads": 2},
        "decode_tok_s": fig(decode),
        "prefill_tok_s": {"128": fig(prefill)},
    }
    if encode is not None:
        result |= {"image_encode_ms": fig(encode), "ttft_ms": fig(2 * encode)}
    return result


def test_compare_prints_ratios_and_draws_a_chart(tmp_path):
    paths = []
    for i, result in enumerate(
        [
            _result("ours", 20.0, 300.0, 100.0),
            _result("torch", 10.0, 600.0, 400.0),
            _result("llama.cpp Q4_0", 40.0, 150.0, None),
        ]
    ):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(result))
    chart = tmp_path / "chart.png"
    proc = cli("compare", *paths, "-o", chart)
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("ours", "torch", "llama.cpp"))
    }
    assert "20.0   (1.00x)" in rows["ours"]
    assert (
        "10.0   (0.50x)" in rows["torch"] and "600.0   (2.00x)" in rows["torch"] and "400.0   (0.25x)" in rows["torch"]
    )
    assert "40.0   (2.00x)" in rows["llama.cpp"] and "150.0   (0.50x)" in rows["llama.cpp"]
    assert rows["llama.cpp"].rstrip().endswith("-")  # no image encode / TTFT for a text-only peer
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    proc = cli("compare", *paths, "--baseline", "1")
    assert "20.0   (2.00x)" in proc.stdout


@pytest.mark.parametrize(
    "document,message",
    [
        ({"decode": 3}, "field 'schema' is missing, expected 'mobilevlm-mlc-bench/1'"),
        ({"schema": None}, "field 'schema' is None, expected 'mobilevlm-mlc-bench/1'"),
        ({"schema": "mobilevlm-mlc-bench/0"}, "field 'schema' is 'mobilevlm-mlc-bench/0', expected"),
        ([1, 2], "a JSON list, expected a benchmark result object"),
        ("text", "a JSON str, expected a benchmark result object"),
    ],
)
def test_compare_rejects_other_json(tmp_path, document, message):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(document))
    proc = cli("compare", path)
    assert proc.returncode == 2
    assert f"{path}: {message}" in cli_error(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_tracker(tmp_path_factory):
    """A TVM RPC tracker and one CPU server registered under key 'test-cpu', both on 127.0.0.1. Fails at
    once, with the processes' own stderr, when either exits or the server never registers."""
    logs = tmp_path_factory.mktemp("rpc")
    tracker_port, server_port = _free_port(), _free_port()
    commands = {
        "tracker": [
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(tracker_port),
            "--port-end",
            str(tracker_port + 1),
        ],
        "server": [
            "tvm.exec.rpc_server",
            "--tracker",
            f"127.0.0.1:{tracker_port}",
            "--key",
            "test-cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(server_port),
            "--port-end",
            str(server_port + 1),
        ],
    }
    procs = {}
    for name, command in commands.items():
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def failure(why: str) -> str:
        return why + "".join(
            f"\n--- {n} (exit {p.poll()}) ---\n{(logs / f'{n}.log').read_text()[-3000:]}" for n, p in procs.items()
        )

    try:
        deadline = time.time() + 60
        while True:
            exited = [n for n, p in procs.items() if p.poll() is not None]
            if exited:
                pytest.fail(failure(f"the RPC {' and '.join(exited)} exited"))
            try:
                query = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tvm.exec.query_rpc_tracker",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(tracker_port),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=15,
                )
                said = query.stdout[-500:] + query.stderr[-500:]
            except subprocess.TimeoutExpired:
                said = "(the query timed out)"
            if "test-cpu" in said:
                break
            if time.time() > deadline:
                pytest.fail(failure(f"no server registered with the tracker in 60 s; query said: {said}"))
            time.sleep(1)
        yield f"127.0.0.1:{tracker_port}"
    finally:
        for proc in procs.values():
            stop_group(proc)


def test_remote_engine_matches_local(ldpnet_built, ldpnet_engine, rpc_tracker):
    remote = Engine(ldpnet_built.dist, ldpnet_built.lib, remote=connect(rpc_tracker, "test-cpu"))
    ids = ldpnet_engine.tokenizer.encode("a short prompt")
    demo = ROOT / "mobilevlm_mlc" / "assets" / "demo.png"
    local_logits = ldpnet_engine.teacher_forced_logits(ids, [], [5, 6, 7])
    remote_logits = remote.teacher_forced_logits(ids, [], [5, 6, 7])
    np.testing.assert_array_equal(remote_logits, local_logits)  # the same kernels on the same CPU
    image = ldpnet_engine.image_embed(ldpnet_engine.pixels(demo))
    remote_image = remote.image_embed(remote.pixels(demo))
    np.testing.assert_array_equal(remote_image.numpy(), image.numpy())
    # a prompt of text and image assembled in the remote embedding buffer (views and copies over RPC),
    # and a token drawn through the remote processors and softmax
    prompt_ids = ids[:2] + [IMAGE_TOKEN_ID] + ids[2:]
    config = GenerationConfig(temperature=0.8, seed=3, repetition_penalty=1.3, logit_bias={5: 2.0})
    local, far = (
        engine.teacher_forced_logits(prompt_ids, [engine.image_embed(engine.pixels(demo))], [5, 6])
        for engine in (ldpnet_engine, remote)
    )
    np.testing.assert_array_equal(far, local)
    drawn = []
    for engine in (ldpnet_engine, remote):
        with engine.chat() as session:
            list(session.send_tokens("Describe it.", demo, config))
            drawn.append(session.last.output_token_ids)
    assert drawn[0] == drawn[1] and drawn[0]


def test_bench_through_an_rpc_tracker(ldpnet_built, rpc_tracker, tmp_path):
    out = tmp_path / "rpc.json"
    proc = cli(
        "bench",
        ldpnet_built.dist,
        "--lib",
        ldpnet_built.lib,
        *FAST,
        "--rpc-tracker",
        rpc_tracker,
        "--rpc-key",
        "test-cpu",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["environment"]["rpc_key"] == "test-cpu" and result["environment"]["rpc_tracker"] == rpc_tracker
    assert result["peak_rss_mib"] is None  # the remote process's memory is not observable through RPC
    for figure in [
        result["image_encode_ms"],
        result["decode_tok_s"],
        result["ttft_ms"],
        *result["prefill_tok_s"].values(),
    ]:
        assert _spread_ok(figure), figure


def test_bench_names_a_missing_rpc_device(ldpnet_built, rpc_tracker, tmp_path):
    proc = cli(
        "bench", ldpnet_built.dist, "--lib", ldpnet_built.lib, "--rpc-tracker", "127.0.0.1:notaport", "--rpc-key", "k"
    )
    assert proc.returncode == 2 and "--rpc-tracker '127.0.0.1:notaport': expected HOST:PORT" in cli_error(proc)


def test_gguf_from_the_checkpoint(ldpnet_built, tmp_path):
    """The llama.cpp peer's F16 GGUF holds the decoder's weights, q/k rows in GGML's rope order."""
    from gguf import GGUFReader

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peers import write_gguf_f16

    from mobilevlm_mlc.convert.checkpoint import CheckpointTensors, load_config

    path = write_gguf_f16(ldpnet_built.checkpoint, tmp_path / "m.gguf")
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    ckpt = CheckpointTensors(ldpnet_built.checkpoint)
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.0.ffn_down.weight"].data),
        ckpt.get("model.layers.0.mlp.down_proj.weight").astype(np.float16),
    )
    q = ckpt.get("model.layers.1.self_attn.q_proj.weight").astype(np.float16)
    heads = load_config(ldpnet_built.checkpoint).text.num_attention_heads
    head_dim = q.shape[0] // heads
    permuted = np.asarray(tensors["blk.1.attn_q.weight"].data)
    # GGML row 2j of a head is HF row j; row 2j+1 is HF row j + head_dim/2
    np.testing.assert_array_equal(permuted[0], q[0])
    np.testing.assert_array_equal(permuted[1], q[head_dim // 2])
    np.testing.assert_array_equal(permuted[head_dim + 2], q[head_dim + 1])
    assert len(tensors) == 3 + 9 * (1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk.")))


def test_peers_script_runs_on_the_default_model(ldpnet_built, tmp_path):
    out = tmp_path / "peers"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "peers.py"),
            "--checkpoint",
            str(ldpnet_built.checkpoint),
            "--size",
            "tiny",
            "--quantizations",
            "q4f32_3",
            "--peers",
            "pytorch-fp32",
            "--prompt-lengths",
            "8",
            "--decode-tokens",
            "4",
            "--repeat",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours, torch_result = (
        json.loads((out / name).read_text()) for name in ("mobilevlm-mlc-q4f32_3.json", "pytorch-fp32.json")
    )
    assert torch_result["engine"] == "pytorch" and _spread_ok(torch_result["decode_tok_s"])
    assert 0 < ours["bandwidth"]["fraction_of_limit"] and ours["bandwidth"]["read_gb_s"] > 0
    assert "memory bandwidth (STREAM-style read, 2 threads)" in proc.stdout
    assert (out / "chart.png").stat().st_size > 10_000


def test_peak_memory_is_the_benchmark_process_own(tmp_path):
    """A benchmark child must not report its parent's peak (ru_maxrss survives fork and exec on Linux)."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this (parent) process
    ballast[::512] += 1
    out = subprocess.run(
        [sys.executable, "-c", "from mobilevlm_mlc.bench.benchmark import peak_rss_mib; print(peak_rss_mib())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert float(out) < 300, out
    del ballast


BAD_BENCHMARK_ARGS = [  # (script, arguments, what the error line names); FILE: a file that is not JSON
    ("serve_load.py", ["--llama-server", "FILE"], "--llama-server: expected an executable program"),
    ("serve_load.py", ["--llama-server", sys.executable, "--out", "FILE"], "--out: FILE is a file"),
    ("serve_load.py", ["--llama-server", sys.executable, "--clients", "1,0"], "--clients"),
    (
        "serve_load.py",
        ["--llama-server", sys.executable, "--max-tokens", "5000"],
        "argument --max-tokens: expected an integer in [1, 1920], got 5000",
    ),
    ("serve_chat.py", ["--workdir", "FILE/below"], "--workdir: FILE is a file"),
    ("peers.py", ["--prompt-lengths", "128,x"], "--prompt-lengths"),
    ("batch_decode.py", ["--threads", "0"], "--threads: expected an integer >= 1"),
    ("quantization.py", ["-o", "FILE"], "FILE: exists and is not a json file"),
    ("arm_instructions.py", ["--out", "FILE"], "FILE: exists and is not a json file"),
    ("quantization.py", ["-o", "/proc/mobilevlm-mlc-test.json"], "/proc is not writable"),  # even as root
    ("compile_times.py", ["--workdir", "FILE"], "--workdir: FILE is a file"),
    ("profile_kernels.py", ["FILE.missing", "FILE.missing", "decode"], "dist folder not found"),
    ("ab_libraries.py", ["FILE.missing", "a.so", "b.so", "--prefill", "8x0"], "--prefill: found '8x0'"),
    ("ab_libraries.py", ["FILE.missing", "a.so", "b.so", "--out", "FILE"], "FILE: exists and is not a json file"),
    ("ab_libraries.py", ["FILE.missing", "a.so", "b.so"], "dist folder not found"),
    ("ab_libraries.py", ["FILE.missing", "a.so", "FILE", "--out", "FILE"], "output would overwrite or lie inside"),
]


@pytest.mark.parametrize("script,arguments,named", BAD_BENCHMARK_ARGS, ids=lambda v: str(v)[:40])
def test_benchmarks_refuse_bad_input_with_one_error_line(tmp_path, script, arguments, named):
    """The benchmarks share the CLI's error path: one `error:` line, exit 2, checked before any work,
    and a file the user named is never replaced."""
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    arguments = [a.replace("FILE", str(file)) for a in arguments]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *arguments], capture_output=True, text=True, timeout=120
    )
    assert named.replace("FILE", str(file)) in cli_error(proc)
    assert file.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
