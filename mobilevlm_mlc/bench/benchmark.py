"""`bench`: image encode, prefill, decode and time-to-first-token of a compiled library, with the
environment needed to compare results from different machines honestly.

The result schema is shared with the peers (`benchmarks/peers.py`: PyTorch eager, llama.cpp), so
`compare` lays them side by side. Every figure is `{"median", "min", "max"}` over `repeat` runs after
one warm-up run; prefill throughput counts the image tokens in front of the prompt.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE

SCHEMA = "mobilevlm-mlc-bench/1"


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeat` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def _cpuinfo(*keys: str) -> str | None:
    """The first /proc/cpuinfo value under one of `keys` (None where there is no such file or key)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(keys)), None)


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


# the vector features that choose kernels (x86 `flags`, AArch64 `Features` in /proc/cpuinfo)
VECTOR_FEATURES = (
    "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_int8", "asimd", "asimddp", "i8mm", "fphp", "sve",
)  # fmt: skip


def cpu_features() -> list[str]:
    """Which of `VECTOR_FEATURES` this CPU has: every result says what its kernels could use."""
    flags = (_cpuinfo("flags", "Features") or "").split()
    return [feature for feature in VECTOR_FEATURES if feature in flags]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(threads: int | None = None) -> dict:
    import tvm

    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "tvm": tvm.__version__,
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    across fork and exec, so a benchmark started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class BenchSettings:
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    decode_tokens: int = 128
    repeat: int = 3
    threads: int | None = None
    warmup: int = 1  # untimed runs before the timed ones (0 for full-size models on slow builds)
    batch: int = 1  # sequences decoded together (`batch_decode` when > 1); decode tok/s is then their sum

    def to_dict(self, image_tokens: int) -> dict:
        return {
            "prompt_lengths": list(self.prompt_lengths),
            "decode_tokens": self.decode_tokens,
            "repeat": self.repeat,
            "warmup": self.warmup,
            "threads": self.threads,
            "batch": self.batch,
            "image_tokens": image_tokens,
        }


def check_fits(settings: BenchSettings, image_tokens: int, context_window: int) -> None:
    longest = image_tokens + max(settings.prompt_lengths) + settings.decode_tokens
    if longest > context_window:
        raise MobileVLMError(
            f"{image_tokens} image tokens + a {max(settings.prompt_lengths)}-token prompt + {settings.decode_tokens} "
            f"decoded tokens = {longest} exceeds the context window ({context_window})"
        )


def bench_engine(
    engine, image: Path, prompt: str, settings: BenchSettings, progress: Callable[[str], None] = lambda _: None
) -> dict:
    """Benchmark a loaded `Engine` (local, or on a remote device through RPC)."""
    from mobilevlm_mlc.runtime.conversation import Conversation, tokenize_with_images

    image_tokens = engine.dist.config.num_image_tokens
    check_fits(settings, image_tokens, engine.context_window_size)
    rng = np.random.default_rng(0)
    vocab = int(engine.metadata["vocab_size"])
    pixels = engine.pixels(image)
    progress("image encode")
    encoded = []
    encode = timed(lambda: encoded.append(engine.image_embed(pixels)), settings.repeat, settings.warmup)
    image_embeds = encoded[-1]

    def prefill(prompt: list) -> np.ndarray:
        seq = engine.add_sequence()
        try:
            return engine.prefill([seq], [prompt])[0].numpy()[0, -1]
        finally:
            engine.remove_sequence(seq)

    prefill_tok_s = {}
    for length in settings.prompt_lengths:
        progress(f"prefill {image_tokens}+{length}")
        parts = [image_embeds, engine.embed(rng.integers(3, vocab, length).tolist())]
        runs = timed(lambda p=parts: prefill(p), settings.repeat, settings.warmup)
        prefill_tok_s[str(length)] = summary([(image_tokens + length) / s for s in runs])

    progress(f"decode {settings.decode_tokens}" + (f" x {settings.batch} sequences" if settings.batch > 1 else ""))
    context = [image_embeds, engine.embed(rng.integers(3, vocab, min(settings.prompt_lengths)).tolist())]

    def decode_run() -> None:
        """Greedy decode of `batch` sequences, one `decode` / `batch_decode` call per step, argmax on the host
        (the sampler's cost is not the model's)."""
        seqs = [engine.add_sequence() for _ in range(settings.batch)]
        try:
            rows = engine.prefill(seqs, [context] * len(seqs))
            tokens = [int(np.argmax(row.numpy()[0, -1])) for row in rows]
            started = time.perf_counter()
            for _ in range(settings.decode_tokens):
                tokens = [int(t) for t in np.argmax(engine.decode(seqs, tokens).numpy()[:, 0], axis=1)]
            decode_run.seconds.append(time.perf_counter() - started)
        finally:
            for seq in seqs:
                engine.remove_sequence(seq)

    decode_run.seconds = []
    for _ in range(settings.warmup + settings.repeat):
        decode_run()
    tokens = settings.decode_tokens * settings.batch
    decode_tok_s = summary([tokens / s for s in decode_run.seconds[settings.warmup :]])

    progress("time to first token")
    conversation = Conversation(template=dict(engine.dist.chat_config["conv_template"]))
    text = conversation.user_turn(prompt, with_image=True)

    def first_token() -> int:
        ids = tokenize_with_images(engine.tokenizer, text, add_bos=True)
        parts = engine.prompt(ids, [engine.image_embed(engine.pixels(image))])
        first_token.tokens = sum(int(part.shape[0]) for part in parts)
        return int(np.argmax(prefill(parts)))

    ttft = timed(first_token, settings.repeat, settings.warmup)
    return {
        "image_encode_ms": summary([s * 1000 for s in encode]),
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "ttft_ms": summary([s * 1000 for s in ttft]),
        "ttft_tokens": first_token.tokens,  # the chat turn of `prompt` with its image, as prefilled
        "settings": settings.to_dict(image_tokens),
    }


def write_result(result: dict, output: Path | None) -> None:
    if output is None:
        return
    from mobilevlm_mlc.fileio import write_json_atomic

    write_json_atomic(Path(output), json.dumps(result, indent=2))


def run_bench(
    dist_dir: Path,
    lib: Path,
    image: Path,
    prompt: str,
    settings: BenchSettings,
    device: str = "cpu",
    rpc: tuple[str, str] | None = None,
    label: str | None = None,
    progress=None,
) -> dict:
    """The `bench` command: load the library (here, or on an RPC device) and benchmark it."""
    from mobilevlm_mlc.runtime.backend import connect
    from mobilevlm_mlc.runtime.engine import Engine
    from mobilevlm_mlc.runtime.threads import use_threads

    threads = None if rpc else use_threads(settings.threads)  # a remote device's pool is its own
    session = connect(*rpc) if rpc else None
    started = time.perf_counter()
    engine_tokens = None  # the KV cache: one context window, or room for every sequence of the batch
    if settings.batch > 1:
        from mobilevlm_mlc.formats.dist import load_dist

        config = load_dist(dist_dir).config
        per_sequence = config.num_image_tokens + min(settings.prompt_lengths) + settings.decode_tokens + KV_PAGE_SIZE
        engine_tokens = max(settings.batch * per_sequence, config.context_window_size)
    engine = Engine(
        dist_dir,
        lib,
        device=device,
        remote=session,
        max_sequences=max(4, settings.batch),
        kv_cache_tokens=engine_tokens,
    )
    load_s = time.perf_counter() - started
    figures = bench_engine(engine, image, prompt, settings, progress or (lambda _: None))
    build = engine.metadata.get("build", {})
    environment_info = session.environment() if session else environment()
    return {
        "schema": SCHEMA,
        "label": label or f"mobilevlm-mlc {build.get('target', '?')} {engine.dist.quantization.name}",
        "engine": "mobilevlm-mlc",
        "target": build.get("target"),
        "quantization": engine.dist.quantization.name,
        "build": build,  # the library's record: its target, TVM, CPU arithmetic (int8 dot product) or CUDA archs
        "model_config": engine.dist.chat_config["model_config"],
        "environment": environment_info
        | {"threads": threads or settings.threads, "rpc": f"{rpc[0]} key={rpc[1]}" if rpc else None},
        "load_s": load_s,
        **figures,
        "peak_rss_mib": session.peak_rss_mib() if session else peak_rss_mib(),
    }
