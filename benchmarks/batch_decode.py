"""Aggregate decode throughput of the `cpu` library for several batch sizes, in one run.

    python benchmarks/batch_decode.py --size 1.7b --batches 1,2,4,8 --threads 2

Builds a random-weight checkpoint of the chosen shape (official layout), converts and compiles it once,
then runs `mobilevlm-mlc bench --batch N` for each N in its own process (decode through `batch_decode`
when N > 1) and `compare`s the results: decode tok/s summed over the batch, and its ratio to batch 1.
Prefill and image figures are measured by each run too but only decode differs between them.

The peer, in the same run and on the same weights (`--peers`, needs `pip install -e ".[peers]"`):
llama.cpp's multi-sequence decode (`benchmarks/peers.py`, llama-cpp-python's `llama_decode` with one
token of each of N sequences per call, as llama.cpp's server batches parallel requests), same context
length per sequence and the same number of decode steps. `--peers ""` runs ours alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run

ROOT = Path(__file__).resolve().parents[1]


PEERS = ("llama.cpp-F16", "llama.cpp-Q4_0", "llama.cpp-Q4_K_S")


def _batches(value: str) -> list[int]:
    return [argtypes.integer(1, 64)(b) for b in value.split(",")]  # `bench --batch`'s range


def _peers(value: str) -> list[str]:
    peers = [p for p in value.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r} (expected some of {', '.join(PEERS)})")
    return peers


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1.7b")
    parser.add_argument("--quantization", default="q4f16_3")
    parser.add_argument("--batches", type=_batches, default=_batches("1,2,4,8"), help="batch sizes, 1 to 64")
    parser.add_argument("--decode-tokens", type=argtypes.positive, default=64)
    parser.add_argument("--repeat", type=argtypes.positive, default=3)
    parser.add_argument("--threads", type=argtypes.positive, default=2)
    parser.add_argument("--workdir", type=argtypes.folder, default=ROOT / "dist" / "batch")
    parser.add_argument("--out", type=argtypes.folder, default=ROOT / "benchmarks" / "results" / "batch-decode")
    parser.add_argument(
        "--peers", type=_peers, default=_peers("llama.cpp-Q4_0"), help=f"some of {', '.join(PEERS)}, or ''"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peers import synthetic_build

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, dist, lib = synthetic_build(args.workdir, args.size, args.quantization)
    results = []
    for batch in args.batches:
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
    peers = [_peer_results(peer, checkpoint, args) for peer in args.peers]
    subprocess.run(
        [*cli, "compare", *map(str, results + [p for runs in peers for p in runs]), "-o", str(args.out / "chart.png")],
        check=True,
    )
    _print_scaling(results, peers)


def _peer_results(peer: str, checkpoint: Path, args: argparse.Namespace) -> list[Path]:
    """llama.cpp at each batch size, each in its own process, on a GGUF of the same weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peers import gguf_for

    gguf = gguf_for(checkpoint, args.workdir, args.size, peer.removeprefix("llama.cpp-"), args.threads)
    outs = []
    for batch in args.batches:
        out = args.out / f"{peer}-batch-{batch}.json"
        print(f"== {peer} batch {batch}", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--one", peer, "--batch", str(batch),
             "--checkpoint", str(checkpoint), "--gguf", str(gguf), "--result", str(out), "--prompt-lengths", "32",
             "--decode-tokens", str(args.decode_tokens), "--repeat", str(args.repeat), "--threads", str(args.threads)],
            check=True,
        )  # fmt: skip
        outs.append(out)
    return outs


def _print_scaling(ours: list[Path], peers: list[list[Path]]) -> None:
    """Aggregate decode per batch size: ours, each peer, and ours over the peer, in one table."""
    import json

    def rate(path: Path) -> float:
        return json.loads(path.read_text())["decode_tok_s"]["median"]

    base = rate(ours[0])
    print(
        "\nbatch  ours tok/s (x batch 1)"
        + "".join(f"  {json.loads(p[0].read_text())['label'].rsplit(' batch', 1)[0]:>22} (ours/peer)" for p in peers)
    )
    for i, path in enumerate(ours):
        batch = json.loads(path.read_text())["settings"]["batch"]
        cells = "".join(f"  {rate(p[i]):22.1f} ({rate(path) / rate(p[i]):.2f}x)" for p in peers)
        print(f"{batch:5d}  {rate(path):10.1f} ({rate(path) / base:.2f}x)" + cells)


if __name__ == "__main__":
    sys.exit(run("batch_decode", main))
