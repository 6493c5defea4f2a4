"""What a kernel change buys: two `cpu` libraries of one model, alternated in one process.

    python benchmarks/ab_libraries.py DIST BASE.so CHANGED.so --batches 1,8 --context 130 --prefill 8x66

BASE is the library compiled before the change (copy it aside, change the code, compile again). Both
load into one process on DIST's weights; each batch size's sequences are prefilled with the same random
embeddings, then the two libraries' decode steps alternate (`benchmarks/kv_cache.py`'s `step_times`),
and so do prefills of N sequences of T new tokens each (one `batch_prefill`). A shared VM's speed drifts
by tens of % within minutes, so only work timed side by side is compared: medians and CHANGED / BASE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import step_times

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.bench.benchmark import environment
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic

PREFILL_ROUNDS = 4  # a prefill of 8 x 66 tokens takes ~1 s: fewer alternations than the steps' --rounds


def prefill_times(engines: dict, sequences: int, tokens: int, rounds: int) -> dict[str, float]:
    """Median ms of one prefill of `sequences` new sequences of `tokens` random embeddings each, the
    libraries alternated in `rounds`."""
    import tvm

    rng = np.random.default_rng(1)
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            dtype = engine.dist.config.dtype
            embeddings = [
                (rng.standard_normal((tokens, engine.hidden_size)) * 0.02).astype(dtype) for _ in range(sequences)
            ]
            prompts = [[tvm.runtime.tensor(e, engine.device)] for e in embeddings]
            ids = [engine.add_sequence() for _ in range(sequences)]
            try:
                started = time.perf_counter()
                engine.prefill(ids, prompts)[-1].numpy()
                times[name].append(time.perf_counter() - started)
            finally:
                for seq in ids:
                    engine.remove_sequence(seq)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def prefill_shape(value: str) -> tuple[int, int]:
    """`NxT`: N sequences of T tokens."""
    try:
        sequences, tokens = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"found {value!r}, expected N x T such as 8x66") from None
    if not 1 <= sequences <= 8 or not 1 <= tokens <= 1024:
        raise argparse.ArgumentTypeError(f"found {value!r}, expected 1-8 sequences of 1-1024 tokens")
    return sequences, tokens


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", type=argtypes.path)
    parser.add_argument("base", type=argtypes.path)
    parser.add_argument("changed", type=argtypes.path)
    parser.add_argument("--batches", type=argtypes.integers(1, 8), default=[1, 8])
    parser.add_argument("--context", type=argtypes.integer(1, 1500), default=130)
    parser.add_argument("--prefill", type=prefill_shape, default=(8, 66), help="N x T: N sequences of T tokens")
    parser.add_argument("--rounds", type=argtypes.integer(1), default=8, help="alternations per measurement")
    parser.add_argument("--steps", type=argtypes.integer(1), default=4, help="decode steps per alternation")
    parser.add_argument("--threads", type=argtypes.integer(1), default=2)
    parser.add_argument("--out", type=argtypes.path, help="also write the results here (a .json file)")
    args = parser.parse_args()
    if args.out is not None:
        check_output_file(args.out, "json", [args.dist, args.base, args.changed])  # never over an input

    from mobilevlm_mlc.runtime.engine import Engine
    from mobilevlm_mlc.runtime.threads import use_threads

    use_threads(args.threads)
    most = max(max(args.batches), args.prefill[0])
    tokens = most * (max(args.context, args.prefill[1]) + args.rounds * args.steps + 32)
    engines = {
        name: Engine(args.dist, lib, max_sequences=most, kv_cache_tokens=tokens)
        for name, lib in (("base", args.base), ("changed", args.changed))
    }
    rows = []
    for batch in args.batches:
        ms = step_times(engines, batch, args.context, args.rounds, args.steps)
        rows.append({"work": f"decode step, {batch} x {args.context} tokens", "ms": ms})
    sequences, length = args.prefill
    rows.append(
        {
            "work": f"prefill, {sequences} x {length} tokens",
            "ms": prefill_times(engines, sequences, length, PREFILL_ROUNDS),
        }
    )
    for row in rows:
        ms = row["ms"]
        row["changed_over_base"] = ms["changed"] / ms["base"]
        print(
            f"{row['work']:36s} base {ms['base']:8.2f} ms  changed {ms['changed']:8.2f} ms  {row['changed_over_base']:.3f}x"
        )
    if args.out is not None:
        results = {"environment": environment(args.threads), "settings": vars(args), "rows": rows}
        write_json_atomic(args.out, json.dumps(results, indent=2, default=str))
        print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(run("ab_libraries", main))
