"""A multi-turn image chat against `mobilevlm-mlc serve` (the MobileVLM-1.7B shape's `cpu` build), with the
prefix cache on and off, in one run: each turn resends the whole conversation and its image, as OpenAI's
clients do. Per turn: the prompt's tokens, how many the prefix cache supplied, and the time to the first
streamed token.

    python benchmarks/serve_chat.py --workdir /work/peers-work --turns 3 --rounds 2 \
        --out benchmarks/results/serve-chat-1.7b

Each server first answers a text request and a request with another picture (the vision encoder's and the
prefill's buffers allocated), then the chat. `--rounds R` alternates on and off R times; medians.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import sys
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import synthetic_build
from serve_load import Served, free_port, stream_chat

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.bench.benchmark import environment
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.demo import DEMO_IMAGE
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = (
    "What is in the image?",
    "What colours do you see?",
    "Describe the background.",
    "What could happen next?",
    "Summarize what we said.",
)


def data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed answer: its text, time to first token, and usage."""
    started, deltas, usage = stream_chat(url, "model", messages, max_tokens)
    return {
        "answer": "".join(content for _, content in deltas),
        "ttft_ms": 1000 * (deltas[0][0] - started),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }


def chat(url: str, turns: int, max_tokens: int) -> list[dict]:
    image = Image.open(DEMO_IMAGE).convert("RGB")
    turn(url, [{"role": "user", "content": "Hello."}], 4)  # warm-up: text, then another picture
    other = [
        {"type": "image_url", "image_url": {"url": data_url(ImageOps.mirror(image))}},
        {"type": "text", "text": "?"},
    ]
    turn(url, [{"role": "user", "content": other}], 4)
    picture = {"type": "image_url", "image_url": {"url": data_url(image)}}
    messages, results = [], []
    for i in range(turns):
        question = QUESTIONS[i % len(QUESTIONS)]
        messages.append(
            {"role": "user", "content": [picture, {"type": "text", "text": question}] if i == 0 else question}
        )
        result = turn(url, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["answer"]})
        results.append(result | {"turn": i + 1})
    return results


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1.7b")
    parser.add_argument("--quantization", default="q4f16_3")
    parser.add_argument("--turns", type=argtypes.integer(1, 20), default=3)
    parser.add_argument("--max-tokens", type=argtypes.integer(1), default=32)
    parser.add_argument("--rounds", type=argtypes.integer(1), default=1)
    parser.add_argument("--threads", type=argtypes.integer(1), default=2)
    parser.add_argument("--workdir", type=argtypes.folder, default=ROOT / "dist" / "peers")
    parser.add_argument("--out", type=argtypes.folder, default=ROOT / "benchmarks" / "results" / "serve-chat")
    args = parser.parse_args()

    check_output_file(args.out / "serve-chat.json", "json")  # before minutes of load
    _, dist, lib = synthetic_build(args.workdir, args.size, args.quantization)
    env = os.environ | {"TVM_NUM_THREADS": str(args.threads)}
    runs = []
    for round_ in range(args.rounds):
        for cache in (8, 0):
            port = free_port()
            cmd = [sys.executable, "-m", "mobilevlm_mlc.cli", "serve", str(dist), "--lib", str(lib)]
            cmd += ["--port", str(port), "--model-id", "model", "--prefix-cache", str(cache)]
            server = Served(cmd, port, "/health", env)
            try:
                for result in chat(server.url, args.turns, args.max_tokens):
                    runs.append(result | {"prefix_cache": cache, "round": round_})
                    print(
                        f"round {round_ + 1} prefix cache {cache}: turn {result['turn']} prompt "
                        f"{result['prompt_tokens']} cached {result['cached_tokens']} TTFT {result['ttft_ms']:.0f} ms",
                        flush=True,
                    )
            finally:
                server.stop()

    summary = []
    print(f"\nmedians of {args.rounds} round(s)")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT on ms':>11} {'TTFT off ms':>12} {'off / on':>9}")
    for t in range(1, args.turns + 1):
        on = [r for r in runs if r["turn"] == t and r["prefix_cache"]]
        off = [r for r in runs if r["turn"] == t and not r["prefix_cache"]]
        row = {
            "turn": t,
            "prompt_tokens": on[0]["prompt_tokens"],
            "cached_tokens": on[0]["cached_tokens"],
            "ttft_ms_on": statistics.median(r["ttft_ms"] for r in on),
            "ttft_ms_off": statistics.median(r["ttft_ms"] for r in off),
        }
        summary.append(row)
        print(
            f"{t:>4} {row['prompt_tokens']:>7} {row['cached_tokens']:>7} {row['ttft_ms_on']:>11.0f} "
            f"{row['ttft_ms_off']:>12.0f} {row['ttft_ms_off'] / row['ttft_ms_on']:>8.2f}x"
        )
    results = {"environment": environment(args.threads), "settings": vars(args), "runs": runs, "summary": summary}
    write_json_atomic(args.out / "serve-chat.json", json.dumps(results, indent=2, default=str))
    print(f"-> {args.out / 'serve-chat.json'}")


if __name__ == "__main__":
    sys.exit(run("serve_chat", main))
