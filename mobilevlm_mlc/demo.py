"""`demo`: the main job on the built-in default, from nothing to a streamed answer on this CPU.

Builds a small random-weight MobileVLM checkpoint in the official layout (so the answer is gibberish,
but every stage is the real one), converts it (q0f32), compiles it for `cpu` and asks about the bundled
picture. Steps whose output already exists in the work folder are reused.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_IMAGE = Path(__file__).parent / "assets" / "demo.png"
DEMO_PROMPT = "What is in the image?"


def demo(workdir: Path, projector: str, prompt: str, max_new_tokens: int) -> None:
    from mobilevlm_mlc.check.synthetic import make_checkpoint
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.formats.manifest import MANIFEST, library_is_recorded
    from mobilevlm_mlc.runtime.engine import Engine
    from mobilevlm_mlc.runtime.sampling import GenerationConfig

    from .compiler import compile_model

    checkpoint = workdir / f"checkpoint-{projector}"
    dist = workdir / f"{projector}-q0f32"
    lib = workdir / f"{projector}-q0f32-cpu.so"
    steps = [  # (what, what it makes, whether that is there and current, how)
        (
            "random-weight checkpoint",
            checkpoint,
            lambda: (checkpoint / "config.json").exists(),
            lambda: make_checkpoint(checkpoint, projector),
        ),
        (
            "convert (q0f32)",
            dist,
            lambda: (dist / MANIFEST).exists(),
            lambda: convert(checkpoint, dist, "q0f32", progress=False),
        ),
        ("compile for cpu", lib, lambda: library_is_recorded(dist, lib), lambda: compile_model(dist, "cpu", lib)),
    ]
    for label, output, done, run in steps:
        if done():
            print(f"[demo] {label}: reusing {output}")
            continue
        started = time.perf_counter()
        run()
        print(f"[demo] {label}: {time.perf_counter() - started:.1f} s")
    engine = Engine(dist, lib)
    print(f"[demo] image: {DEMO_IMAGE}\n[demo] USER: {prompt}\n[demo] ASSISTANT:", end=" ", flush=True)
    started = time.perf_counter()
    with engine.chat() as session:
        for delta in session.send(prompt, DEMO_IMAGE, GenerationConfig(max_new_tokens=max_new_tokens)):
            print(delta, end="", flush=True)
        turn = session.last
    elapsed = time.perf_counter() - started
    print(
        f"\n[demo] {len(turn.prompt_token_ids)} prompt ids (+{engine.dist.config.num_image_tokens} image tokens), "
        f"{len(turn.output_token_ids)} generated in {elapsed:.2f} s (random weights: the text is noise)"
    )
