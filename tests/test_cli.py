"""The command line as users type it: run (streaming, --output-json), verify, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilevlm_mlc.cli import main
from mobilevlm_mlc.runtime.conversation import Conversation

from .helpers import DEMO_IMAGE, checkpoint_for, cli, cli_error, error_of


def test_run_streams_and_writes_json(ldpnet_built, workspace, tmp_path):
    from mobilevlm_mlc.check.reference import ReferenceMobileVLM

    out = tmp_path / "answer.json"
    proc = cli(
        "run",
        ldpnet_built.dist,
        "--lib",
        ldpnet_built.lib,
        "--image",
        DEMO_IMAGE,
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        "8",
        "--output-json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    reference = ReferenceMobileVLM(ldpnet_built.checkpoint)
    ids = reference.input_ids(Conversation().user_turn("What is in the image?", with_image=True))
    assert result["prompt_token_ids"] == ids
    image = Image.open(DEMO_IMAGE)
    tokens, logits = reference.greedy(reference.input_embeds(ids, reference.image_embeds(reference.pixels(image))), 8)
    assert result["output_token_ids"] == tokens
    assert len(result["first_logits"]) == 32000
    assert np.abs(np.array(result["first_logits"]) - logits).max() < 1e-4 * np.abs(logits).max()
    assert proc.stdout.strip() == reference.tokenizer.decode(tokens).strip()


def test_sampling_flags_are_seeded(ldpnet_built, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        proc = cli(
            "run",
            ldpnet_built.dist,
            "--lib",
            ldpnet_built.lib,
            "--prompt",
            "Tell me a story.",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            "3",
            "--output-json",
            out,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(out.read_text())["output_token_ids"])
    assert runs[0] == runs[1] and len(runs[0]) == 6


@pytest.mark.slow  # compiles
def test_verify_passes_on_default_model(workspace, capsys):
    ckpt = checkpoint_for(workspace, "ldpnetv2")
    assert main(["verify", str(ckpt), "--tokens", "16", "--workdir", str(workspace / "verify-ldpnetv2")]) == 0
    out = capsys.readouterr().out
    for boundary in ("pixels", "vision features", "projector output", "first-token logits"):
        line = next(text for text in out.splitlines() if text.startswith(boundary))
        assert line.endswith("ok")
    assert "greedy tokens: 16/16 leading tokens agree  ok" in out
    assert out.strip().endswith("PASS")


def test_run_errors(ldpnet_built, tmp_path, capfd):
    dist, lib = ldpnet_built.dist, ldpnet_built.lib
    assert "dist folder not found" in cli_error(cli("run", tmp_path / "nodist", "--lib", lib, "--prompt", "hi"))
    assert "compiled library not found" in error_of(capfd, "run", dist, "--lib", tmp_path / "no.so", "--prompt", "hi")
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF garbage")
    assert "junk.so: not a 64-bit little-endian ELF file" in error_of(
        capfd, "run", dist, "--lib", junk, "--prompt", "hi"
    )
    other = Path(np.linalg._umath_linalg.__file__)  # a whole ELF shared object, but not a TVM library
    assert "not a library built by mobilevlm-mlc compile" in error_of(
        capfd, "run", dist, "--lib", other, "--prompt", "hi"
    )
    text = tmp_path / "photo.jpg"
    text.write_text("not a picture")
    assert "photo.jpg: not a readable image" in error_of(
        capfd, "run", dist, "--lib", lib, "--image", text, "--prompt", "hi"
    )
    long_prompt = "word " * 2100
    assert "does not fit the context window" in error_of(capfd, "run", dist, "--lib", lib, "--prompt", long_prompt)


def test_convert_and_compile_errors(ldpnet_built, tmp_path, capfd):
    ckpt = ldpnet_built.checkpoint
    out = tmp_path / "out"
    assert "unknown quantization 'q3f16'" in cli_error(cli("convert", ckpt, "--quantization", "q3f16", "-o", out))
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me")
    assert "busy: exists and was not written by mobilevlm-mlc; refusing to replace it" in error_of(
        capfd, "convert", ckpt, "--quantization", "q0f32", "-o", busy
    )
    assert (busy / "precious.txt").read_text() == "keep me"
    assert "unknown target 'toaster'" in error_of(
        capfd, "compile", ldpnet_built.dist, "--target", "toaster", "-o", tmp_path / "x.so"
    )
    assert "mlc-chat-config.json not found" in error_of(
        capfd, "compile", tmp_path, "--target", "cpu", "-o", tmp_path / "x.so"
    )
    assert not (tmp_path / "x.so").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
