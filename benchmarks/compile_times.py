"""Checkpoint -> dist -> library wall times for the default (tiny) model and full MobileVLM shapes.

    python benchmarks/compile_times.py --sizes tiny,1.7b --workdir dist/bench

Builds random-weight checkpoints (official layout) of each size, converts them (q0f32) and compiles
them for `cpu`, printing each step's time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert import convert
from mobilevlm_mlc.synthetic import make_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,1.7b")
    parser.add_argument("--quantization", default="q0f32")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("dist/bench"))
    args = parser.parse_args()
    for size in args.sizes.split(","):
        ckpt = args.workdir / f"ckpt-{size}"
        if not (ckpt / "config.json").exists():
            make_checkpoint(ckpt, "ldpnet", size=size)
        started = time.perf_counter()
        dist = convert(ckpt, args.workdir / f"{size}-{args.quantization}", args.quantization, progress=False)
        converted = time.perf_counter()
        report = compile_model(dist, args.target, args.workdir / f"{size}-{args.quantization}-{args.target}.so")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{size:>5} {args.quantization} {args.target}: convert {converted - started:6.1f} s, "
              f"compile {report['export_s'] + report['build_s']:6.1f} s (export {report['export_s']:.1f}, "
              f"build {report['build_s']:.1f}); peak RSS so far {rss:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
