"""Where the time goes: every kernel and VM builtin of one `decode`, `prefill` or `image_embed` call of
a compiled library, timed through the Relax VM's instrument hook (one call, after one untimed call).

    python benchmarks/profile_kernels.py DIST LIB decode --context 256
    python benchmarks/profile_kernels.py DIST LIB decode --context 256 --batch 8   # batch_decode
    python benchmarks/profile_kernels.py DIST LIB prefill --tokens 272
    python benchmarks/profile_kernels.py DIST LIB image

Per-kernel times include the VM's call overhead; their sum is printed next to the call's wall time.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import tvm

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.threads import use_threads


class KernelTimer:
    """VM instrument: wall time and calls per function name."""

    def __init__(self):
        self.active = False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self._started: dict[str, float] = {}

    def __call__(self, _func, name: str, before_run: bool, _ret, *_args) -> int:
        if not self.active:
            return 0
        if before_run:
            self._started[name] = time.perf_counter()
        else:
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
            self.calls[name] += 1
        return 0  # go on running


def main() -> None:
    parser = argtypes.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dist", type=argtypes.path)
    parser.add_argument("lib", type=argtypes.path)
    parser.add_argument("entry", choices=["decode", "prefill", "image"])
    parser.add_argument("--context", type=argtypes.count, default=16, help="tokens in the cache before a decode step")
    parser.add_argument(
        "--tokens", type=argtypes.positive, default=272, help="prefill length (144 image tokens + text)"
    )
    parser.add_argument(
        "--batch", type=argtypes.positive, default=1, help="decode: sequences per step (> 1: batch_decode)"
    )
    parser.add_argument("--top", type=argtypes.positive, default=15)
    parser.add_argument(
        "--threads",
        type=argtypes.positive,
        default=os.cpu_count(),
        help="TVM's pool threads (default: one per physical core, or TVM_NUM_THREADS)",
    )
    args = parser.parse_args()
    use_threads(args.threads)

    engine = Engine(args.dist, args.lib)
    rng = np.random.default_rng(0)
    dtype, hidden = engine.dist.config.dtype, engine.hidden_size

    def embeds(n: int) -> np.ndarray:
        return (rng.standard_normal((n, hidden)) * 0.02).astype(dtype)

    timer = KernelTimer()

    def run_once() -> float:
        if args.entry == "image":
            size = engine.dist.config.vision.image_size
            started, timer.active = time.perf_counter(), True
            engine.image_embed(np.zeros((1, size, size, 3), np.uint8))
            timer.active = False
            return time.perf_counter() - started
        batch = args.batch if args.entry == "decode" else 1
        seqs = [engine.add_sequence() for _ in range(batch)]
        if args.entry == "decode" and args.context:
            context = [[tvm.runtime.tensor(embeds(args.context), engine.device)]] * batch
            engine.prefill(seqs, context)
        if batch > 1:  # [b, 1, hidden] through batch_decode
            entry, x = "batch_decode", tvm.runtime.tensor(embeds(batch)[:, None], engine.device)
        else:
            entry = args.entry
            x = tvm.runtime.tensor(embeds(1 if args.entry == "decode" else args.tokens)[None], engine.device)
        engine.kv.begin_forward(seqs, [1] * batch if batch > 1 else [x.shape[1]])
        started, timer.active = time.perf_counter(), True
        engine.vm[entry](x, engine.kv.handle, engine.params)
        took, timer.active = time.perf_counter() - started, False
        engine.kv.end_forward()
        for seq in seqs:
            engine.remove_sequence(seq)
        return took

    engine.vm.set_instrument(timer)
    run_once()  # first-call allocations
    timer.seconds.clear()
    timer.calls.clear()
    wall = run_once()
    rows = sorted(timer.seconds.items(), key=lambda item: -item[1])
    print(
        f"{args.entry}: {wall * 1e3:.1f} ms wall, {sum(timer.seconds.values()) * 1e3:.1f} ms in {sum(timer.calls.values())} calls"
    )
    for name, seconds in rows[: args.top]:
        print(f"{seconds * 1e3:10.2f} ms {timer.calls[name]:5d}x  {name}")


if __name__ == "__main__":
    sys.exit(run("profile_kernels", main))
