"""What each quantization costs and weighs on a MobileLLaMA-1.4B-shaped model (MobileVLM-1.7B layout,
random weights). For each scheme: convert time and peak memory, library size, weight bytes, peak memory
of `run`, and accuracy against the fp32 PyTorch reference over a 64-token teacher-forced continuation
(logits cosine, max abs error, top-1 agreement).

    python benchmarks/quantization.py --workdir dist/bench [--quantizations q0f32,q4f16_1,q4f32_1,q4f16_0]

The accuracy prompt is text-only: the vision tower is never quantized, so the decoder is what differs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import run_measured

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic

PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: Describe a red house under a yellow sun. ASSISTANT:"


def main() -> None:
    parser = argtypes.Parser()
    parser.add_argument("--workdir", type=argtypes.folder, default=Path("dist/bench"))
    parser.add_argument("--size", choices=SHAPES, default="1.7b")
    parser.add_argument("--quantizations", default="q0f32,q4f16_1,q4f32_1,q4f16_0")
    parser.add_argument("--tokens", type=argtypes.positive, default=64)
    parser.add_argument("-o", "--output", type=argtypes.path, default=None)
    args = parser.parse_args()
    if args.output:
        check_output_file(args.output, "json")  # before minutes of work

    from mobilevlm_mlc.check.reference import ReferenceMobileVLM
    from mobilevlm_mlc.check.synthetic import make_checkpoint
    from mobilevlm_mlc.check.verify import accuracy
    from mobilevlm_mlc.runtime.engine import Engine

    ckpt = args.workdir / f"ckpt-{args.size}"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, "ldpnet", size=args.size)
    checkpoint_bytes = sum(p.stat().st_size for p in ckpt.glob("*.bin"))
    reference = ReferenceMobileVLM(ckpt)
    ids = reference.tokenizer(PROMPT).input_ids
    ref_input = reference.input_embeds(ids, None)
    forced, _ = reference.greedy(ref_input, args.tokens, eos_id=None)
    fp32_logits = reference.teacher_forced_logits(ref_input, forced)
    del reference
    print(
        f"checkpoint {ckpt} ({checkpoint_bytes / 2**30:.2f} GiB bf16); {len(ids)} prompt tokens, {len(forced)} teacher-forced",
        flush=True,
    )

    results = {}
    for name in args.quantizations.split(","):
        dist, lib = args.workdir / f"{args.size}-{name}", args.workdir / f"{args.size}-{name}-cpu.so"
        conv = run_measured(["mobilevlm-mlc", "convert", str(ckpt), "--quantization", name, "-o", str(dist), "--quiet"])
        assert conv.returncode == 0, conv.output
        comp = run_measured(["mobilevlm-mlc", "compile", str(dist), "--target", "cpu", "-o", str(lib)])
        assert comp.returncode == 0, comp.output
        weights = sum(p.stat().st_size for p in dist.glob("params_shard_*.bin"))
        run = run_measured(
            ["mobilevlm-mlc", "run", str(dist), "--lib", str(lib), "--prompt", "Hello", "--max-new-tokens", "2"]
        )
        assert run.returncode == 0, run.output
        started = time.perf_counter()
        engine = Engine(dist, lib)
        acc = accuracy(engine.teacher_forced_logits(ids, [], forced), fp32_logits, forced)
        del engine
        results[name] = {
            "convert_s": conv.seconds,
            "convert_peak_rss_gib": conv.peak_rss_gib,
            "convert_peak_anon_gib": conv.peak_anon_gib,
            "compile_s": comp.seconds,
            "library_mib": lib.stat().st_size / 2**20,
            "weights_gib": weights / 2**30,
            "run_peak_rss_gib": run.peak_rss_gib,
            "accuracy_s": time.perf_counter() - started,
            **vars(acc),
        }
        r = results[name]
        print(
            f"{name:8} convert {r['convert_s']:6.1f} s (peak RSS {r['convert_peak_rss_gib']:.2f} GiB, anon {r['convert_peak_anon_gib']:.2f}) | "
            f"compile {r['compile_s']:5.1f} s | weights {r['weights_gib']:.3f} GiB, run peak RSS {r['run_peak_rss_gib']:.2f} GiB | "
            f"vs fp32: cos {acc.cosine_mean:.5f} (min {acc.cosine_min:.5f}), max err {acc.max_abs:.3f}, top-1 {acc.top1_agreement:.1%}",
            flush=True,
        )
    if args.output:
        write_json_atomic(
            args.output, json.dumps({"size": args.size, "tokens": len(forced), "results": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    sys.exit(run("quantization", main))
