"""ONNX Runtime GenAI as a peer: prefill and greedy decode of an int4 (MatMulNBits) model made by its own
model builder from the same decoder weights (`peers.py` writes them as a plain Llama folder).

Runs in ONNX Runtime GenAI's own virtual environment (its builder needs transformers >= 5, which this
project's reference cannot use), so it imports nothing from this project: it prints one JSON object
of figures that `peers.py` completes into a `bench` result.

    VENV/bin/python benchmarks/ort_genai_peer.py build HF_DIR MODEL_DIR --threads 2
    VENV/bin/python benchmarks/ort_genai_peer.py run MODEL_DIR --image-tokens 144 --prompt-lengths 128 ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(hf_dir: Path, out: Path, threads: int) -> None:
    """The builder's int4 CPU model (`-p int4 -e cpu`; its log in `OUT.log`), then its session set to
    `threads` threads."""
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
             "-p", "int4", "-e", "cpu", "-c", str(out / "cache")],
            check=True, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))


def _figure(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


def run(
    model_dir: Path, image_tokens: int, prompt_lengths: list[int], decode_tokens: int, repeat: int, warmup: int
) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)

    def generator(max_length: int) -> og.Generator:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    prefill = {}
    for length in prompt_lengths:
        tokens = rng.integers(3, vocab, image_tokens + length).astype(np.int32)
        rates = []
        for i in range(warmup + repeat):
            gen = generator(len(tokens) + 1)
            started = time.perf_counter()
            gen.append_tokens(tokens)  # the prompt's forward pass, logits of its last token
            if i >= warmup:
                rates.append(len(tokens) / (time.perf_counter() - started))
        prefill[str(length)] = _figure(rates)
    context = rng.integers(3, vocab, image_tokens + min(prompt_lengths)).astype(np.int32)
    rates = []
    for i in range(warmup + repeat):
        gen = generator(len(context) + decode_tokens + 1)
        gen.append_tokens(context)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            gen.generate_next_token()
        if i >= warmup:
            rates.append(decode_tokens / (time.perf_counter() - started))
    return {"prefill_tok_s": prefill, "decode_tok_s": _figure(rates), "onnxruntime_genai": og.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("hf_dir", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("model_dir", type=Path)
    r.add_argument("--image-tokens", type=int, default=144)
    r.add_argument("--prompt-lengths", type=lambda v: [int(x) for x in v.split(",")], default=[128])
    r.add_argument("--decode-tokens", type=int, default=64)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.command == "build":
        build(args.hf_dir, args.out, args.threads)
    else:
        figures = run(
            args.model_dir, args.image_tokens, args.prompt_lengths, args.decode_tokens, args.repeat, args.warmup
        )
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
