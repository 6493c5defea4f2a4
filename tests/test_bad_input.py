"""Bad or unusual input (issue 13), through the command line as a user types it: every failure a user
can cause ends in exactly one `error:` line and exit 2, leaves the output location as it was, and
never destroys what the tool did not write; SIGTERM and a closed pipe end quietly and clean up."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from mobilevlm_mlc.cli import main
from mobilevlm_mlc.fileio import TEMP_PREFIX
from mobilevlm_mlc.formats.manifest import MANIFEST

from .helpers import checkpoint_for, cli, cli_error, error_of


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with a digest of its bytes (folders as 'dir'), to compare before/after."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        found[rel] = (
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "other"
        )
    return found


def png(width: int, height: int) -> bytes:
    """A valid PNG header for width x height over a few bytes of data (what a bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def edited_checkpoint(source: Path, folder: Path, **changes) -> Path:
    """A copy of `source` (weights linked, not copied) with config.json changed."""
    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---- never destroy what the tool did not write -------------------------------------------------------


def test_convert_never_replaces_a_folder_it_did_not_write(ldpnet_built, tmp_path, capfd):
    """The reported data loss: the input checkpoint inside the output folder, a user's file in a dist,
    a folder of somebody else's: each refused with nothing touched. A dist of ours (with a library
    compiled into it) is replaced."""
    ckpt = ldpnet_built.checkpoint
    dist = tmp_path / "dist"
    shutil.copytree(ldpnet_built.dist, dist)
    shutil.copytree(ckpt, dist / "ck")
    before = snapshot(tmp_path)
    message = error_of(capfd, "convert", dist / "ck", "--quantization", "q0f32", "-o", dist, "--quiet")
    assert f"{dist}: the output folder overlaps the input {dist / 'ck'}" in message
    assert snapshot(tmp_path) == before

    shutil.rmtree(dist / "ck")
    (dist / "notes.txt").write_text("mine")
    (dist / "more").mkdir()
    (dist / "more" / "a.so").write_bytes(b"x")
    before = snapshot(tmp_path)
    message = error_of(capfd, "convert", ckpt, "--quantization", "q0f32", "-o", dist, "--quiet")
    assert "holds what mobilevlm-mlc did not write (2 entries: more/, notes.txt); refusing to replace it" in message
    assert snapshot(tmp_path) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "mlc-chat-config.json").write_text("{}")  # looks like a dist, but no manifest of ours
    assert "was not written by mobilevlm-mlc; refusing to replace it" in error_of(
        capfd, "convert", ckpt, "--quantization", "q0f32", "-o", other, "--quiet"
    )
    assert (other / "mlc-chat-config.json").read_text() == "{}"
    assert "overlaps the input" in error_of(
        capfd, "convert", ckpt, "--quantization", "q0f32", "-o", ckpt / "dist", "--quiet"
    )

    (dist / "notes.txt").unlink()
    shutil.rmtree(dist / "more")
    manifest = json.loads((dist / MANIFEST).read_text())
    manifest["libraries"]["lib.so"] = {"sha256": "0" * 64}
    (dist / MANIFEST).write_text(json.dumps(manifest))
    (dist / "lib.so").write_bytes(b"\x7fELF")
    assert main([str(a) for a in ("convert", ckpt, "--quantization", "q0f32", "-o", dist, "--quiet")]) == 0
    assert sorted(p.name for p in dist.iterdir()) == sorted(p.name for p in ldpnet_built.dist.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_files_replace_only_their_own_kind(ldpnet_built, tmp_path, capfd):
    dist, lib = ldpnet_built.dist, ldpnet_built.lib
    notes = tmp_path / "notes.so"
    notes.write_text("my notes")
    assert f"{notes}: exists and is not a library file; refusing to replace it" in error_of(
        capfd, "compile", dist, "--target", "cpu", "-o", notes
    )
    assert notes.read_text() == "my notes"
    chat = dist / "mlc-chat-config.json"
    kept = chat.read_bytes()
    assert "would overwrite or lie inside the input" in error_of(
        capfd, "run", dist, "--lib", lib, "--prompt", "hi", "--output-json", chat
    )
    assert chat.read_bytes() == kept
    longest = tmp_path / ("n" * 250 + ".json")  # a legal name (255 bytes): the temporary beside it is short
    assert (
        main(
            [
                str(a)
                for a in (
                    "run",
                    dist,
                    "--lib",
                    lib,
                    "--prompt",
                    "hi",
                    "--max-new-tokens",
                    "2",
                    "--output-json",
                    longest,
                )
            ]
        )
        == 0
    )
    assert len(json.loads(longest.read_text())["output_token_ids"]) == 2
    result = tmp_path / "result.json"
    result.write_text("my notes, not JSON")
    assert "would overwrite or lie inside the input" in error_of(capfd, "compare", result, "-o", result)
    assert result.read_text() == "my notes, not JSON"


# ---- validation where data enters -------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rope_theta": 0}, "field 'rope_theta' is 0.0, expected a number in (0, 1e+12]"),
        ({"rms_norm_eps": -1e-6}, "field 'rms_norm_eps' is -1e-06, expected a number in (0, 1]"),
        ({"rope_theta": float("nan")}, "field 'rope_theta' is nan"),
        ({"num_hidden_layers": 10_000_000}, "field 'num_hidden_layers' is 10000000, expected a number in [1, 1024]"),
        ({"max_position_embeddings": 1e9}, "field 'max_position_embeddings' is 1000000000.0, expected int"),
        (
            {"max_position_embeddings": 1 << 30},
            "field 'max_position_embeddings' is 1073741824, expected a number in [1, 1048576]",
        ),
        ({"vocab_size": True}, "field 'vocab_size' is True, expected int"),
        (
            {"num_attention_heads": 3, "num_key_value_heads": 3},
            "field 'hidden_size' 256 is not divisible by num_attention_heads 3",
        ),
        ({"mm_vision_select_layer": 40}, "field 'vision.select_layer' 40 is outside the vision tower's 4 layers"),
    ],
)
def test_config_values_are_checked_before_work(ldpnet_built, tmp_path, changes, message, capfd):
    ckpt = edited_checkpoint(ldpnet_built.checkpoint, tmp_path / "ckpt", **changes)
    out = tmp_path / "out"
    assert message in error_of(capfd, "convert", ckpt, "--quantization", "q0f32", "-o", out, "--quiet")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dist_config_is_checked_when_read(ldpnet_built, tmp_path, capfd):
    """mlc-chat-config.json is a file users edit: its model config and conv_template are validated."""
    for edit, message in [
        (lambda c: c["model_config"]["text"].update(rope_theta=-1.0), "field 'model_config.text.rope_theta' is -1.0"),
        (lambda c: c["model_config"]["text"].pop("vocab_size"), "field 'model_config.text.vocab_size' is missing"),
        (lambda c: c["model_config"].update(vision=[]), "field 'model_config.vision' is [], expected an object"),
        (lambda c: c.pop("conv_template"), "field 'conv_template' is None, expected an object"),
        (
            lambda c: c["conv_template"].update(seps=[]),
            "field 'conv_template.seps' is [], expected a list of one or two strings",
        ),
        (lambda c: c["conv_template"].update(stop_token_ids="2"), "field 'conv_template.stop_token_ids' is '2'"),
    ]:
        dist = tmp_path / f"dist{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ldpnet_built.dist, dist)
        config = json.loads((dist / "mlc-chat-config.json").read_text())
        edit(config)
        (dist / "mlc-chat-config.json").write_text(json.dumps(config))
        assert message in error_of(capfd, "run", dist, "--lib", ldpnet_built.lib, "--prompt", "hi")


def test_integer_tensors_are_refused(ldpnet_built, tmp_path, capfd):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ldpnet_built.checkpoint, ckpt)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    (ckpt / "pytorch_model.bin").unlink()
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.int32)
    save_file(state, ckpt / "model.safetensors")
    message = error_of(capfd, "convert", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out", "--quiet")
    assert "tensor lm_head.weight has dtype int32, expected a floating-point type" in message


def test_missing_tensors_are_summarized(ldpnet_built, tmp_path, capfd):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ldpnet_built.checkpoint, ckpt)
    import torch

    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if "vision_tower" not in k}, ckpt / "pytorch_model.bin")
    message = error_of(capfd, "convert", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out", "--quiet")
    count = sum("vision_tower" in k and "layers.3." not in k and "post_layernorm" not in k for k in state)
    assert f"the checkpoint lacks {count} tensors (model.vision_tower.* {count}; e.g. " in message
    assert len(message) < 400


@pytest.mark.parametrize("size", [(100_000, 2), (30_000, 3), (2, 12_000)])
def test_image_size_is_checked_before_decoding(ldpnet_built, tmp_path, size, capfd):
    """The reported bombs: tiny files whose padded square would take gigabytes."""
    image = tmp_path / "thin.png"
    image.write_bytes(png(*size))
    side = max(size)
    message = error_of(capfd, "run", ldpnet_built.dist, "--lib", ldpnet_built.lib, "--image", image, "--prompt", "hi")
    assert f"thin.png: image is {size[0]}x{size[1]}; padded to a square it would be {side}x{side}" in message


def test_non_finite_logits_stop_generation(ldpnet_built, tmp_path, capfd):
    """Weights with a NaN (a broken shard that still has a matching md5): generation stops with an error."""
    dist = tmp_path / "dist"
    shutil.copytree(ldpnet_built.dist, dist)
    cache = json.loads((dist / "tensor-cache.json").read_text())
    shard = next(s for s in cache["records"] if any(r["name"] == "lm_head.weight" for r in s["records"]))
    record = next(r for r in shard["records"] if r["name"] == "lm_head.weight")
    data = bytearray((dist / shard["dataPath"]).read_bytes())
    data[record["byteOffset"] : record["byteOffset"] + 4] = np.float32("nan").tobytes()
    (dist / shard["dataPath"]).write_bytes(bytes(data))
    shard["md5sum"] = hashlib.md5(bytes(data)).hexdigest()
    (dist / "tensor-cache.json").write_text(json.dumps(cache))
    assert "non-finite logits (NaN or Inf)" in error_of(capfd, "run", dist, "--lib", ldpnet_built.lib, "--prompt", "hi")


# ---- one error line for every failure a user can cause ------------------------------------------------


def _bad_inputs(built, tmp: Path) -> list[tuple[list, str]]:
    """(arguments, a fragment of the one error line) per subcommand."""
    dist, lib, ckpt = built.dist, built.lib, built.checkpoint
    (tmp / "file").write_text("x")
    (tmp / "folder.so").mkdir()
    (tmp / "tar.tar").write_bytes(b"not a tar")
    truncated = tmp / "truncated.so"
    truncated.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    system_lib = tmp / "system.tar"
    subprocess.run(["tar", "cf", str(system_lib), "-C", str(tmp), "file"], check=True)
    (tmp / "result.json").write_text(json.dumps({"schema": "mobilevlm-mlc-bench/1", "label": "x"}))
    (tmp / "package.json").write_text(
        json.dumps(
            {
                "device": "android",
                "model_list": [{"model": str(dist), "model_id": "m", "model_lib": "mobilevlm_m"}],
                "model_lib_path_for_prepare_libs": {"mobilevlm_m": "tar.tar"},
            }
        )
    )
    bad_tokenizer = tmp / "bad-tokenizer"
    bad_tokenizer.mkdir()
    for item in ckpt.iterdir():
        (bad_tokenizer / item.name).symlink_to(item) if item.name != "tokenizer.model" else (
            bad_tokenizer / item.name
        ).write_bytes(b"junk")
    run = ["run", dist, "--lib", lib, "--prompt", "hi"]
    long_name = "n" * 251 + ".json"  # 256 bytes: one more than a name may have
    return [
        (["convert", ckpt, "--quantization", "q9", "-o", tmp / "o"], "unknown quantization 'q9'"),
        (["convert", tmp / "nothing", "--quantization", "q0f32", "-o", tmp / "o"], "model folder not found"),
        (
            ["convert", bad_tokenizer, "--quantization", "q0f32", "-o", tmp / "o"],
            "tokenizer.model: not a SentencePiece model",
        ),
        (["convert", ckpt, "--quantization", "q0f32", "-o", tmp / "file" / "o"], "is a file, not a folder"),
        (["convert", ckpt, "--quantization", "q0f32", "-o", tmp / "file"], "exists and is not a folder"),
        (
            ["convert", ckpt, "--quantization", "q0f32", "-o", tmp / "o", "--prefill-chunk-size", "0"],
            "argument --prefill-chunk-size",
        ),
        (
            ["convert", ckpt, "--quantization", "q0f32", "-o", tmp / "o", "--context-window-size", "100"],
            "--context-window-size / --prefill-chunk-size: field 'prefill_chunk_size' 100 cannot hold one image's 144 tokens",
        ),
        (["compile", dist, "--target", "bogus", "-o", tmp / "x.so"], "unknown target 'bogus'"),
        (["compile", dist, "--target", "cpu", "-o", tmp / "x.tar"], "writes a '.so' library"),
        (["compile", dist, "--target", "cpu", "--cpu", "rpi5", "-o", tmp / "x.so"], "it has no --cpu presets"),
        (
            ["compile", dist, "--target", "vulkan", "--kv-cache", "int8", "-o", tmp / "x.so"],
            "--kv-cache int8: target 'vulkan' has no 8-bit KV cache (targets with one: cpu, arm64-linux)",
        ),
        (["compile", dist, "--kv-cache", "fp8", "-o", tmp / "x.so"], "argument --kv-cache: invalid choice: 'fp8'"),
        (
            ["compile", dist, "--target", "arm64-linux", "--cpu", "m1", "-o", tmp / "x.so"],
            "--cpu 'm1': not a CPU of target 'arm64-linux' (expected one of cortex-a78, orin, rpi5",
        ),
        (["chat", dist, "--lib", lib, "--image", tmp / "none.png"], "none.png: image not found"),
        (["chat", dist, "--lib", truncated], "truncated"),
        (["chat", dist, "--lib", lib, "--temperature", "-1"], "argument --temperature"),
        (["serve", dist, "--lib", lib, "--allow-image-dir", tmp / "file"], "--allow-image-dir"),
        (["serve", dist, "--lib", tmp / "folder.so"], "folder.so"),
        (["verify", ckpt, "--target", "android-cpu"], "an Android system library runs only inside an app"),
        (["verify", ckpt, "--target", "cuda"], "--target cuda: no CUDA GPU on this machine (TVM finds none)"),
        (["verify", ckpt, "--target", "orin-cuda"], "this one runs only on its device"),
        (["check-kernels", dist, "--target", "cuda"], "generates cuda code for this machine's own runtime"),
        (
            ["emulate", "--target", "cpu", "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "k"],
            "does not run under qemu-user",
        ),
        (["emulate", "--rpc-tracker", "nohost", "--rpc-key", "k"], "--rpc-tracker 'nohost': expected HOST:PORT"),
        (["emulate", "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "k"], "127.0.0.1:9: no RPC tracker answers there"),
        (["verify", ckpt, "--target", "arm64-linux", "--cpu", "m1"], "--cpu 'm1': not a CPU of target 'arm64-linux'"),
        (["compile", dist, "--target", "cpu", "-o", tmp / "folder.so"], "is a folder; expected a file path"),
        (
            ["compile", dist, "--target", "cpu", "-o", tmp / ("x" * 300 + ".so")],
            "longer than the 255 this file system allows",
        ),
        ([*run[:3], truncated, *run[4:]], "truncated"),
        ([*run[:3], system_lib, *run[4:]], "is a system library (.tar)"),
        ([*run[:3], tmp / "file", *run[4:]], "not a shared library (no ELF header)"),
        ([*run, "--seed", "-1"], "argument --seed: expected an integer in [0, 18446744073709551615], got -1"),
        ([*run, "--temperature", "nan"], "argument --temperature: expected a number in [0, 100], got nan"),
        ([*run, "--top-p", "0"], "argument --top-p"),
        ([*run, "--top-k", "-3"], "argument --top-k"),
        ([*run, "--max-new-tokens", "many"], "argument --max-new-tokens: expected an integer, got 'many'"),
        ([*run, "--device", "bogus"], "argument --device: device 'bogus': expected one of cpu"),
        ([*run, "--device", "cuda"], "holds CPU code only, but the device is 'cuda'"),
        (
            [
                *run[:5],
                os.fsdecode(b"caf\xe9"),
            ],
            "argument --prompt: not valid UTF-8 text",
        ),
        ([*run, "--output-json", tmp], "is a folder; expected a file path"),
        ([*run, "--output-json", tmp / "file" / "a.json"], "is a file, not a folder"),
        ([*run, "--output-json", tmp / long_name], "longer than the 255"),
        ([*run, "--image", tmp / "file"], "not a readable image"),
        (["check-kernels", dist, "--target", "bogus"], "unknown target 'bogus'"),
        (["bench", dist, "--lib", lib, "--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
        (["bench", dist, "--lib", lib, "--prompt-lengths", "0"], "argument --prompt-lengths"),
        (["compare", tmp / "result.json"], "field 'environment' is missing or not an object"),
        (["compare", tmp / "file"], "not a readable benchmark result"),
        (["package", tmp / "file", "-o", tmp / "pkg"], "not valid JSON"),
        (
            ["package", tmp / "package.json", "-o", tmp / "pkg"],
            "library 'tar.tar' for 'mobilevlm_m' is not a .tar system library",
        ),
        (["inspect", tmp / "tar.tar"], "not a library built by mobilevlm-mlc compile"),
        (["verify", tmp / "nothing"], "model folder not found"),
        (["nosuchcommand"], "argument command: invalid choice"),
        ([], "the following arguments are required: command"),
    ]


def test_every_bad_input_gives_one_error_line_and_changes_nothing(ldpnet_built, tmp_path, capfd):
    """The property of issue 13: exit 2, exactly one stderr line, which starts with `error:`, no
    traceback, and the folder the outputs would go to exactly as it was."""
    cases = _bad_inputs(ldpnet_built, tmp_path)
    dist_before = snapshot(ldpnet_built.dist)
    for args, fragment in cases:
        before = snapshot(tmp_path)
        message = error_of(capfd, *args)
        assert fragment in message, (args, message)
        assert snapshot(tmp_path) == before, args
    assert snapshot(ldpnet_built.dist) == dist_before


def test_errors_reach_a_terminal_as_one_line(ldpnet_built, tmp_path):
    """The same through the installed entry point, in a process of its own, for a few of them."""
    for args, fragment in _bad_inputs(ldpnet_built, tmp_path)[11:12]:
        assert fragment in cli_error(cli(*args))


def test_a_closed_pipe_ends_quietly(ldpnet_built):
    """`run ... | head -c 3`: the reader goes away; we stop without a word on stderr."""
    command = [
        sys.executable,
        "-m",
        "mobilevlm_mlc.cli",
        "run",
        str(ldpnet_built.dist),
        "--lib",
        str(ldpnet_built.lib),
        "--prompt",
        "Tell me a long story.",
        "--max-new-tokens",
        "64",
    ]
    reader = subprocess.Popen(["head", "-c", "3"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc = subprocess.run(command, stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=300)
    reader.stdin.close()
    reader.wait()
    assert proc.stderr == "" and proc.returncode == 128 + signal.SIGPIPE


@pytest.mark.slow  # runs convert in a child process
def test_sigterm_removes_temporaries(workspace, tmp_path):
    """SIGTERM while convert writes: exit 143, no output folder, no temporary left beside it."""
    ckpt = checkpoint_for(workspace, "ldpnet")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mobilevlm_mlc.cli",
            "convert",
            str(ckpt),
            "--quantization",
            "q4f16_3",
            "-o",
            str(out),
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "convert ended before it wrote anything"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_version():
    from mobilevlm_mlc import __version__

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"mobilevlm-mlc {__version__} (apache-tvm 0.27"), proc.stdout
