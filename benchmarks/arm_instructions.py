"""What a decode GEMV costs on an Arm core, read from its code instead of timed: emulated speed means
nothing, and no phone is reachable here. For each decode matmul shape of the MobileVLM-1.7B decoder, the
int8 GEMV is built for an Arm target (`arm64-linux`, `--cpu` preset) exactly as `compile` builds it,
disassembled, and the innermost loop that holds the `sdot`s is counted: its instructions by kind and per
16 weights (one `sdot` multiplies 16 weight bytes by 16 activation bytes). Beside it, the same count for
llama.cpp's Q4_0 x Q8_0 dot product on NEON + dotprod, counted from its source (one intrinsic taken as
one instruction; see LLAMA_CPP below).

    python benchmarks/arm_instructions.py [--cpu cortex-a78] [--out benchmarks/results/arm-gemv-instructions.json]
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import tvm

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic
from mobilevlm_mlc.targets import get_target
from mobilevlm_mlc.targets.cpu_kernels.int8_dot import int8_dot
from mobilevlm_mlc.targets.cpu_kernels.int8_matmul import int8_quantized_gemv

# (K, N) of the 1.7B decoder's decode matmuls: qkv, o, gate+up, down, logits
SHAPES = {"qkv": (2048, 6144), "o_proj": (2048, 2048), "gate_up": (2048, 11264), "down": (5632, 2048)}
KINDS = {  # instruction -> kind, for the mix
    "ldr": "load",
    "ldp": "load",
    "ld1": "load",
    "ld1r": "load",
    "and": "unpack (and/shift)",
    "ushr": "unpack (and/shift)",
    "sdot": "sdot",
    "scvtf": "int -> fp32",
    "fcvtl": "fp16 -> fp32",
    "fcvtl2": "fp16 -> fp32",
    "fmul": "fp32 multiply/add",
    "fmla": "fp32 multiply/add",
    "fadd": "fp32 multiply/add",
    "movi": "zero accumulators",
}
# llama.cpp's ggml_vec_dot_q4_0_q8_0, NEON + dotprod path (one row), counted from its source by kind per
# loop iteration of 2 blocks = 64 weights: 2 weight and 4 activation vector loads + 4 fp16 scale loads,
# unpack 4 (2 AND, 2 shift), subtract 8: 4, sdot 4, zeroed accumulators 2, int -> fp32 2, fp16 scales
# converted 4, scale products and accumulation 2 fmul + 2 fmla (vmlaq_n_f32 fused: the fewest), loop ~4.
LLAMA_CPP = {
    "source": "ggerganov/llama.cpp c392e50 (2025-02-21), ggml/src/ggml-cpu/ggml-cpu-quants.c:2076-2110",
    "weights_per_iteration": 64,
    "by_kind": {
        "load": 6 + 4,
        "unpack (and/shift)": 4,
        "subtract 8": 4,
        "sdot": 4,
        "zero accumulators": 2,
        "int -> fp32": 2,
        "fp16 -> fp32": 4,
        "fp32 multiply/add": 4,
        "loop": 4,
    },
}


def innermost_sdot_loop(asm: str) -> list[str]:
    """The instructions of the smallest loop (a label to a backward branch to it) holding `sdot`s."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L\w+):", line))}
    best: list[str] = []
    for j, line in enumerate(lines):
        m = re.match(r"^\s+(?:b(?:\.\w+)?|cbn?z|tbn?z)\s.*?(\.L\w+)\s*$", line.split("//")[0])
        if not m or labels.get(m.group(1), j) >= j:
            continue
        body = [
            text.split("//")[0].strip()
            for text in lines[labels[m.group(1)] + 1 : j + 1]
            if re.match(r"^\s+[a-z]", text) and not text.strip().startswith(".")
        ]
        if any(op.split()[0] == "sdot" for op in body) and (not best or len(body) < len(best)):
            best = body
    return best


def count(k: int, n: int, target: tvm.target.Target) -> dict:
    dot = int8_dot(target)
    if dot is None:
        raise SystemExit(f"error: --cpu: {target.attrs.get('mcpu')} has no int8 dot product (dotprod)")
    lib = tvm.compile(tvm.IRModule({"main": int8_quantized_gemv(k, n, "float16", dot)}), target=target)
    loop = innermost_sdot_loop(lib.mod.inspect_source("asm"))
    ops = Counter(line.split()[0] for line in loop)
    sdots = ops["sdot"]
    by_kind = Counter()
    for op, c in ops.items():
        by_kind[KINDS.get(op, "loop" if op.startswith("b") or op in ("subs", "cmp", "add") else "other")] += c
    return {
        "k": k,
        "n": n,
        "loop_instructions": len(loop),
        "sdot": sdots,
        "weights_per_iteration": 16 * sdots,
        "instructions_per_16_weights": len(loop) / sdots if sdots else None,
        "by_kind": dict(by_kind.most_common()),
    }


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", default=None, help="arm64-linux --cpu preset (default: its default)")
    parser.add_argument("--out", type=argtypes.path, default=None)
    args = parser.parse_args()
    if args.out:
        check_output_file(args.out, "json")  # before the work
    build_target = get_target("arm64-linux")
    try:
        target = build_target.tvm_target(args.cpu)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    results = {name: count(k, n, target) for name, (k, n) in SHAPES.items()}
    llama_per_16 = sum(LLAMA_CPP["by_kind"].values()) / (LLAMA_CPP["weights_per_iteration"] / 16)
    print(f"decode GEMV inner loops, {target.attrs['mcpu']} (arm64-linux), fp16 activations, int8 sdot")
    print(f"{'matmul':<10}{'K x N':<14}{'loop instr':>11}{'sdot':>6}{'weights':>9}{'instr / 16 weights':>20}")
    for name, r in results.items():
        shape = f"{r['k']} x {r['n']}"
        print(
            f"{name:<10}{shape:<14}{r['loop_instructions']:>11}{r['sdot']:>6}"
            f"{r['weights_per_iteration']:>9}{r['instructions_per_16_weights']:>20.2f}"
        )
    first = next(iter(results.values()))
    print(f"mix per loop iteration ({first['weights_per_iteration']} weights): {first['by_kind']}")
    print(
        f"llama.cpp Q4_0 x Q8_0 (NEON dotprod, from source): {llama_per_16:.2f} instructions per 16 weights "
        f"({sum(LLAMA_CPP['by_kind'].values())} per {LLAMA_CPP['weights_per_iteration']}: {LLAMA_CPP['by_kind']})"
    )
    if args.out:
        record = {"mcpu": str(target.attrs["mcpu"]), "ours": results, "llama_cpp": LLAMA_CPP | {"per_16": llama_per_16}}
        write_json_atomic(args.out, json.dumps(record, indent=2) + "\n")
        print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run("arm_instructions", main))
