"""Checkpoint -> dist -> library wall times, per model size and per target.

    python benchmarks/compile_times.py --sizes tiny,1.7b --targets cpu --workdir dist/bench
    python benchmarks/compile_times.py --sizes 1.7b --targets cpu,android-cpu,android-adreno,cuda,vulkan

Builds random-weight checkpoints (official layout) of each size, converts them to each target's default
quantization (or --quantization) and compiles, printing each step's time. A target this TVM cannot
generate code for (vulkan here) reports how long lowering, scheduling and the limit checks took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.check.synthetic import make_checkpoint
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.formats.manifest import MANIFEST
from mobilevlm_mlc.targets import get_target


def main() -> None:
    parser = argtypes.Parser()
    parser.add_argument("--sizes", default="tiny,1.7b")
    parser.add_argument("--targets", default="cpu")
    parser.add_argument("--quantization", default=None, help="default: each target's own")
    parser.add_argument("--workdir", type=argtypes.folder, default=Path("dist/bench"))
    args = parser.parse_args()
    for size in args.sizes.split(","):
        ckpt = args.workdir / f"ckpt-{size}"
        if not (ckpt / "config.json").exists():
            make_checkpoint(ckpt, "ldpnet", size=size)
        for name in args.targets.split(","):
            target = get_target(name)
            quantization = args.quantization or target.default_quantization
            dist = args.workdir / f"{size}-{quantization}"
            started = time.perf_counter()
            if not (dist / MANIFEST).exists():
                convert(ckpt, dist, quantization, progress=False)
            converted = time.perf_counter()
            try:
                report = compile_model(
                    dist, name, args.workdir / f"{size}-{quantization}-{name}{target.library_suffix}"
                )
                took = f"compile {report['export_s'] + report['build_s']:6.1f} s (export {report['export_s']:.1f}, build {report['build_s']:.1f})"
            except MobileVLMError as err:
                took = f"stopped after {time.perf_counter() - converted:6.1f} s: {str(err)[:90]}"
            print(f"{size:>5} {name:<15} {quantization:<8} convert {converted - started:6.1f} s, {took}", flush=True)


if __name__ == "__main__":
    sys.exit(run("compile_times", main))
