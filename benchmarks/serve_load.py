"""Serving under load: N concurrent streaming clients against `mobilevlm-mlc serve` (the MobileVLM-1.7B
shape's `cpu` build), llama.cpp's own `llama-server --parallel N` (continuous batching) and
llama-cpp-python's `llama_cpp.server` (one request at a time), on the same random decoder weights (the
Q4_0 GGUF `benchmarks/peers.py` writes), in one run.

    python benchmarks/serve_load.py --llama-server PATH/llama-server --clients 1,2,4,8 \
        --workdir /work/peers-work --out benchmarks/results/serve-load-1.7b

llama-server is built from the llama.cpp sources inside llama-cpp-python's sdist from PyPI:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build build --target llama-server -j2

Every client sends `--requests` streaming chat completions one after another: a text prompt (llama.cpp
has no MobileVLM image path) whose user message begins with the request's own number (a prefix cache
can share only what every request shares: each engine's chat template, for ours its system message),
`--max-tokens` tokens with the end-of-sequence token biased away (`logit_bias`) so that
each answer has the same length on every engine; the generated tokens are counted from each answer's
`usage` (or its streamed chunks where a server sends none). `llama_cpp.server` runs with
`--interrupt_requests False`: by default a new request cuts the one it is streaming short. Per engine and
client count: aggregate generated tok/s (all tokens / wall time of the load), time to first token p50/p95,
the gaps between streamed tokens p50/p95, and the load generator's own CPU seconds (it shares the server's
two cores; the clients start together, at a barrier). `--rounds R` repeats the whole sweep R times,
interleaved, and reports medians (the ratio to one client as the median of each round's own ratio): a
shared VM's speed drifts by tens of percent within minutes, more than the differences measured.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import gguf_for, synthetic_build

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.bench.benchmark import environment
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run
from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.fileio import check_output_file, write_json_atomic
from mobilevlm_mlc.model_defs.config import KV_CACHES

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. " * 3
PROMPT_TOKENS = 128  # at most, in any engine's chat template (99 in ours)
CONTEXT = 2048  # tokens of one sequence: llama.cpp's context per slot, the 1.7B shape's window
EOS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server process, up once `health` answers; one that exits or never answers is a MobileVLMError
    with the last line it wrote to stderr."""

    def __init__(self, cmd: list[str], port: int, health: str, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: nothing blocks a chatty server
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MobileVLMError(f"{shlex.join(cmd[:4])} ... exited with {self.process.returncode}{self._said()}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise MobileVLMError(f"{shlex.join(cmd[:4])} ... did not answer {health} in 300 s{self._said()}")

    def _said(self) -> str:
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return f" ({lines[-1]})" if lines else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.stderr.close()


def stream_chat(
    url: str, model: str, messages: list[dict], max_tokens: int
) -> tuple[float, list[tuple[float, str]], dict | None]:
    """A streaming greedy chat completion of `max_tokens` tokens (EOS biased away): when it was sent, each
    piece of content with the time it arrived, and the usage (None where a server sends none).

    The load runs on the same two cores as the server it measures, so the client is the cheapest one the
    standard library makes: `http.client` reading lines (C-buffered) where httpx's stream took ~5x the CPU
    per token (~0.34 ms against ~0.07), time taken from whichever engine is being measured. A refusal
    (its OpenAI error message) or a lost connection is a MobileVLMError naming the server."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(EOS): -100},
    }
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    started, deltas, usage = time.perf_counter(), [], None
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise MobileVLMError(f"{url}: HTTP {response.status}: {_error_message(response.read(2000))}")
        for line in iter(response.readline, b""):
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if content:
                deltas.append((time.perf_counter(), content))
    except (OSError, http.client.HTTPException, ValueError) as err:  # the server went away, or sent no JSON
        raise MobileVLMError(f"{url}: the stream failed ({first_line(err)})") from None
    finally:
        connection.close()
    return started, deltas, usage


def _error_message(body: bytes) -> str:
    """An error response's OpenAI message, else its first 200 bytes."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return repr(body[:200])


def one_request(url: str, model: str, max_tokens: int, number: int) -> dict:
    """One streaming chat completion: time to first token, gaps between tokens, tokens generated."""
    messages = [{"role": "user", "content": f"Request {number}. {PROMPT}"}]
    started, deltas, usage = stream_chat(url, model, messages, max_tokens)
    stamps = [stamp for stamp, _ in deltas]
    return {
        "ttft_s": stamps[0] - started if stamps else None,
        "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": usage["completion_tokens"] if usage else len(stamps),
    }


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    failures: list[Exception] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)  # the clients start together, not one thread start apart

    def client(first: int) -> None:
        ready.wait()
        try:
            for number in range(first, first + requests):
                result = one_request(url, model, max_tokens, number)
                with lock:
                    results.append(result)
        except Exception as err:  # noqa: BLE001 - raised once, from the calling thread, after the others end
            with lock:
                failures.append(err)

    one_request(url, model, 4, 0)  # warm-up
    threads = [threading.Thread(target=client, args=(1 + c * requests,)) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if failures:
        raise failures[0]
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    gaps = sorted(g for r in results for g in r["gaps_s"])

    def pct(values: list[float], q: float) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "clients": clients,
        "requests": clients * requests,
        "wall_s": wall,
        "client_cpu_s": cpu,  # the load generator's own CPU, taken from the two cores the server has
        "generated_tok_s": tokens / wall,
        "ttft_ms": {"p50": 1000 * statistics.median(ttft), "p95": 1000 * pct(ttft, 0.95)},
        "token_gap_ms": {"p50": 1000 * statistics.median(gaps), "p95": 1000 * pct(gaps, 0.95)},
        "tokens": tokens,
        "answer_tokens_min": min(r["tokens"] for r in results),
    }


def main() -> None:
    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1.7b")
    parser.add_argument("--quantization", default="q4f16_3", help="ours")
    parser.add_argument("--clients", type=argtypes.integers(1, 64), default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=argtypes.integer(1), default=2, help="per client")
    parser.add_argument(
        "--rounds",
        type=argtypes.integer(1),
        default=1,
        help="the whole sweep this many times, interleaved: medians are reported",
    )
    parser.add_argument(
        "--max-tokens",
        type=argtypes.integer(1, CONTEXT - PROMPT_TOKENS),
        default=128,
        help=f"per answer; at most {CONTEXT - PROMPT_TOKENS}: a sequence's {CONTEXT} tokens less the prompt",
    )
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default="model",
        help="our library's KV cache (`compile --kv-cache`); int8 gives llama-server q8_0 K and V (flash attention)",
    )
    parser.add_argument("--threads", type=argtypes.integer(1), default=2)
    parser.add_argument("--llama-server", type=argtypes.executable, required=True)
    parser.add_argument("--engines", default="mobilevlm-mlc,llama-server,llama-cpp-python")
    parser.add_argument(
        "--serve-flags", type=shlex.split, default=[], help="more flags for ours, e.g. '--prefix-cache 0'"
    )
    parser.add_argument("--workdir", type=argtypes.folder, default=ROOT / "dist" / "peers")
    parser.add_argument("--out", type=argtypes.folder, default=ROOT / "benchmarks" / "results" / "serve-load")
    args = parser.parse_args()
    unknown = set(args.engines.split(",")) - {"mobilevlm-mlc", "llama-server", "llama-cpp-python"}
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))} (mobilevlm-mlc, llama-server, llama-cpp-python)")

    check_output_file(args.out / "serve-load.json", "json")  # before minutes of load
    checkpoint, dist, lib = synthetic_build(args.workdir, args.size, args.quantization, kv_cache=args.kv_cache)
    gguf = gguf_for(checkpoint, args.workdir, args.size, "Q4_0", args.threads)
    most = max(args.clients)
    env = os.environ | {"TVM_NUM_THREADS": str(args.threads)}

    def start(engine: str, clients: int) -> Served:
        port = free_port()
        if engine == "mobilevlm-mlc":
            cmd = [
                sys.executable,
                "-m",
                "mobilevlm_mlc.cli",
                "serve",
                str(dist),
                "--lib",
                str(lib),
                "--port",
                str(port),
            ]
            per_sequence = max(512, PROMPT_TOKENS + args.max_tokens + 16)  # + the page a fork copies
            cmd += ["--max-sequences", str(most), "--kv-cache-tokens", str(most * per_sequence), "--model-id", "model"]
            cmd += args.serve_flags
            return Served(cmd, port, "/health", env)
        if engine == "llama-server":
            cmd = [str(args.llama_server), "-m", str(gguf), "--port", str(port), "-t", str(args.threads)]
            cmd += ["--parallel", str(clients), "-c", str(CONTEXT * clients), "--cont-batching", "--no-webui"]
            if (
                args.kv_cache == "int8"
            ):  # the same bytes per cached value as ours; llama.cpp's 8-bit V needs flash attention
                cmd += ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on"]
            return Served(cmd, port, "/health", env)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
        cmd += ["--n_threads", str(args.threads), "--n_ctx", str(CONTEXT), "--model_alias", "model"]
        cmd += ["--interrupt_requests", "False"]
        return Served(cmd, port, "/v1/models", env)

    results = {"environment": environment(args.threads), "settings": vars(args) | {"prompt": PROMPT}, "runs": []}
    engines = args.engines.split(",")
    for round_ in range(args.rounds):  # a shared VM's speed drifts by tens of % within minutes: interleave
        for engine in engines:
            for clients in args.clients:
                server = start(engine, clients)  # llama-server's --parallel is the client count
                try:
                    print(f"== round {round_ + 1}: {engine}, {clients} client(s)", flush=True)
                    run = load(server.url, "model", clients, args.requests, args.max_tokens)
                finally:
                    server.stop()
                results["runs"].append(run | {"engine": engine, "round": round_})
                print(
                    f"   {run['generated_tok_s']:7.1f} tok/s  TTFT p50 {run['ttft_ms']['p50']:7.0f} ms "
                    f"p95 {run['ttft_ms']['p95']:7.0f} ms  gap p50 {run['token_gap_ms']['p50']:6.1f} ms "
                    f"p95 {run['token_gap_ms']['p95']:6.1f} ms  client CPU {run['client_cpu_s']:.2f} s",
                    flush=True,
                )
    summary = []
    for engine in engines:
        single = {
            r["round"]: r["generated_tok_s"] for r in results["runs"] if r["engine"] == engine and r["clients"] == 1
        }
        for clients in args.clients:
            runs = [r for r in results["runs"] if r["engine"] == engine and r["clients"] == clients]
            ratios = [r["generated_tok_s"] / single[r["round"]] for r in runs if r["round"] in single]
            summary.append(
                {
                    "engine": engine,
                    "clients": clients,
                    "rounds": len(runs),
                    "generated_tok_s": statistics.median(r["generated_tok_s"] for r in runs),
                    "x_single_client": statistics.median(ratios) if ratios else None,  # each round's own ratio
                    "ttft_ms_p50": statistics.median(r["ttft_ms"]["p50"] for r in runs),
                    "ttft_ms_p95": statistics.median(r["ttft_ms"]["p95"] for r in runs),
                    "token_gap_ms_p50": statistics.median(r["token_gap_ms"]["p50"] for r in runs),
                    "token_gap_ms_p95": statistics.median(r["token_gap_ms"]["p95"] for r in runs),
                    "client_cpu_s": statistics.median(r["client_cpu_s"] for r in runs),
                }
            )
    results["summary"] = summary
    write_json_atomic(args.out / "serve-load.json", json.dumps(results, indent=2, default=str))
    print(f"\nmedians of {args.rounds} round(s); x 1 client: the median of each round's own ratio")
    print(
        f"{'engine':<18}{'clients':>8}{'tok/s':>9}{'x 1 client':>12}{'TTFT p50/p95 ms':>20}{'gap p50/p95 ms':>18}{'client CPU s':>14}"
    )
    for r in summary:
        scale = r["x_single_client"] if r["x_single_client"] is not None else float("nan")
        print(
            f"{r['engine']:<18}{r['clients']:>8}{r['generated_tok_s']:>9.1f}{scale:>11.2f}x"
            f"{r['ttft_ms_p50']:>11.0f} / {r['ttft_ms_p95']:<6.0f}{r['token_gap_ms_p50']:>9.1f} / {r['token_gap_ms_p95']:<6.1f}{r['client_cpu_s']:>10.2f}"
        )
    print(f"-> {args.out / 'serve-load.json'}")


if __name__ == "__main__":
    sys.exit(run("serve_load", main))
