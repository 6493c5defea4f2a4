"""Aggregate decode throughput of the `cpu` library for several batch sizes, in one run.

    python benchmarks/batch_decode.py --size 1.7b --batches 1,2,4,8 --threads 2

Builds a random-weight checkpoint of the chosen shape (official layout), converts and compiles it once,
then runs `mobilevlm-mlc bench --batch N` for each N in its own process (decode through `batch_decode`
when N > 1) and `compare`s the results: decode tok/s summed over the batch, and its ratio to batch 1.
Prefill and image figures are measured by each run too but only decode differs between them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1.7b")
    parser.add_argument("--quantization", default="q4f16_3")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "dist" / "batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch-decode")
    args = parser.parse_args()

    from mobilevlm_mlc.check.synthetic import make_checkpoint
    from mobilevlm_mlc.compiler import compile_model
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.formats.manifest import MANIFEST

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.workdir / f"ckpt-{args.size}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, "ldpnet", size=args.size)
    dist = args.workdir / f"{args.size}-{args.quantization}"
    lib = args.workdir / f"{args.size}-{args.quantization}-cpu.so"
    if not (dist / MANIFEST).exists():
        convert(checkpoint, dist, args.quantization, progress=False)
    compile_model(dist, "cpu", lib)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        out = args.out / f"batch-{batch}.json"
        print(f"== batch {batch}", flush=True)
        cli = [sys.executable, "-m", "mobilevlm_mlc.cli"]
        subprocess.run(
            [*cli, "bench", str(dist), "--lib", str(lib), "--batch", str(batch), "--label", f"cpu {args.quantization} batch {batch}",
             "--prompt-lengths", "32", "--decode-tokens", str(args.decode_tokens), "--repeat", str(args.repeat),
             "--threads", str(args.threads), "-o", str(out)],
            check=True,
        )  # fmt: skip
        results.append(out)
    subprocess.run([*cli, "compare", *map(str, results), "-o", str(args.out / "chart.png")], check=True)


if __name__ == "__main__":
    main()
