"""What `compile --kv-cache int8` buys and costs: decode step time and logits against the default cache.

    python benchmarks/kv_cache.py --size 1.7b --batches 1,8 --contexts 130,400

Builds one random-weight checkpoint of the chosen shape (official layout), converts it once and compiles
the `cpu` library twice: K and V in the model's dtype, and in 8 bits (`--kv-cache int8`). Both load in
one process; for each batch size and context, each library's sequences are prefilled with the same
embeddings, then their `batch_decode` steps alternate (a shared VM's speed drifts by tens of % within
minutes: only steps timed side by side are compared). Accuracy: the same tokens are fed to both
libraries after the same prompt (teacher-forced), and each step's logits are compared: the largest error
relative to the default cache's largest logit, and how often the top token agrees.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import synthetic_build

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.bench.benchmark import environment
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
CACHES = ("model", "int8")


def step_times(engines: dict, batch: int, context: int, rounds: int, steps: int) -> dict[str, float]:
    """Median ms of one `batch_decode` step per cache, `batch` sequences of `context` tokens (+ the steps),
    the caches' steps alternated in `rounds` runs of `steps`."""
    import tvm

    rng = np.random.default_rng(0)
    sequences = {}
    for name, engine in engines.items():
        prompt = (rng.standard_normal((context, engine.hidden_size)) * 0.02).astype(engine.dist.config.dtype)
        sequences[name] = [engine.add_sequence() for _ in range(batch)]
        engine.prefill(sequences[name], [[tvm.runtime.tensor(prompt, engine.device)]] * batch)
    times = {name: [] for name in engines}
    try:
        for _ in range(rounds):
            for name, engine in engines.items():
                for _ in range(steps):
                    started = time.perf_counter()
                    engine.decode(sequences[name], [100] * batch).numpy()
                    times[name].append(time.perf_counter() - started)
    finally:
        for name, engine in engines.items():
            for seq in sequences[name]:
                engine.remove_sequence(seq)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def logit_errors(engines: dict, prompt_tokens: int, steps: int) -> dict[str, float]:
    """Teacher-forced decode of the same tokens through both caches: the largest per-step error relative
    to the default cache's largest logit (max and median over steps), and top-1 agreement."""
    rng = np.random.default_rng(1)
    vocab = min(engine.vocab_size for engine in engines.values())
    prompt = [int(t) for t in rng.integers(3, vocab, prompt_tokens)]
    forced = [int(t) for t in rng.integers(3, vocab, steps)]
    logits = {}
    for name, engine in engines.items():
        seq = engine.add_sequence()
        try:
            first = engine.prefill([seq], [engine.prompt(prompt, [])])[0].numpy().reshape(-1)
            logits[name] = [first] + [engine.decode([seq], [t]).numpy().reshape(-1) for t in forced]
        finally:
            engine.remove_sequence(seq)
    errors = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(logits["int8"], logits["model"])]
    agree = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(logits["int8"], logits["model"])]
    return {
        "rel_err_max": max(errors[1:]),
        "rel_err_median": statistics.median(errors[1:]),
        "prefill_rel_err": errors[0],  # the prompt's own chunk reads no page: equal
        "top1_agreement": sum(agree[1:]) / steps,
    }


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1.7b")
    parser.add_argument("--quantization", default="q4f16_3")
    parser.add_argument("--batches", type=argtypes.integers(1, 8), default=[1, 8])
    parser.add_argument("--contexts", type=argtypes.integers(1, 1500), default=[130, 400])
    parser.add_argument("--rounds", type=argtypes.integer(1), default=8, help="alternations per measurement")
    parser.add_argument("--steps", type=argtypes.integer(1), default=4, help="decode steps per alternation")
    parser.add_argument("--threads", type=argtypes.integer(1), default=2)
    parser.add_argument("--workdir", type=argtypes.folder, default=ROOT / "dist" / "peers")
    parser.add_argument("--out", type=argtypes.folder, default=ROOT / "benchmarks" / "results" / "kv-cache")
    args = parser.parse_args()
    check_output_file(args.out / "kv-cache.json", "json")

    from mobilevlm_mlc.runtime.engine import Engine
    from mobilevlm_mlc.runtime.threads import use_threads

    use_threads(args.threads)
    tokens = max(args.batches) * (max(args.contexts) + args.rounds * args.steps + 16)
    engines = {}
    for cache in CACHES:
        _, dist, lib = synthetic_build(args.workdir, args.size, args.quantization, kv_cache=cache)
        engines[cache] = Engine(dist, lib, max_sequences=max(args.batches), kv_cache_tokens=tokens)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            ms = step_times(engines, batch, context, args.rounds, args.steps)
            rows.append(
                {"batch": batch, "context": context, "step_ms": ms, "int8_over_model": ms["int8"] / ms["model"]}
            )
            print(
                f"batch {batch} context {context:4d}: step {ms['model']:6.2f} ms (model dtype) "
                f"{ms['int8']:6.2f} ms (int8)  int8/model {ms['int8'] / ms['model']:.3f}",
                flush=True,
            )
    accuracy = logit_errors(engines, prompt_tokens=64, steps=64)
    print(
        f"logits, 64 teacher-forced steps: int8 vs model-dtype cache max rel err {accuracy['rel_err_max']:.2e} "
        f"(median {accuracy['rel_err_median']:.2e}), top-1 agreement {accuracy['top1_agreement']:.0%}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(args.threads), "settings": vars(args), "steps": rows, "logits": accuracy}
    write_json_atomic(args.out / "kv-cache.json", json.dumps(results, indent=2, default=str))
    print(f"-> {args.out / 'kv-cache.json'}")


if __name__ == "__main__":
    sys.exit(run("kv_cache", main))
