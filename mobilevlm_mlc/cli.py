"""`mobilevlm-mlc` command line: convert, compile, run, verify, demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import arguments as argtypes
from .demo import DEMO_IMAGE, DEMO_PROMPT
from .errors import MobileVLMError, first_line
from .model_defs.config import KV_CACHES


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=argtypes.positive, default=64)
    p.add_argument("--temperature", type=argtypes.number(0, 100), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=argtypes.number(0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=argtypes.count, default=0)
    p.add_argument("--seed", type=argtypes.integer(0, 2**64 - 1), default=None)
    penalty = "applied by the library's apply_penalty_inplace to the tokens generated so far"
    p.add_argument("--presence-penalty", type=argtypes.number(-2, 2), default=0.0, help=f"-2..2, {penalty}")
    p.add_argument("--frequency-penalty", type=argtypes.number(-2, 2), default=0.0, help=f"-2..2, {penalty}")
    p.add_argument(
        "--repetition-penalty", type=argtypes.number(0, 100, low_open=True), default=1.0, help=f"> 0, {penalty}"
    )
    p.add_argument(
        "--logit-bias",
        type=argtypes.logit_bias,
        action="append",
        default=[],
        metavar="TOKEN_ID=BIAS",
        help="added to that token's logit (-100..100; repeatable)",
    )


def _generation_config(args: argparse.Namespace):
    from mobilevlm_mlc.runtime.sampling import GenerationConfig

    return GenerationConfig(
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.top_k,
        args.seed,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        logit_bias=dict(args.logit_bias),
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.convert.converter import convert

    started = time.perf_counter()
    out = convert(
        args.model_dir,
        args.output,
        args.quantization,
        context_window_size=args.context_window_size,
        prefill_chunk_size=args.prefill_chunk_size,
        progress=not args.quiet,
    )
    print(f"converted {args.model_dir} -> {out} ({args.quantization}) in {time.perf_counter() - started:.1f} s")


def cmd_compile(args: argparse.Namespace) -> None:
    from .compiler import compile_model
    from .targets import get_target

    report = compile_model(args.dist_dir, args.target, args.output, args.cpu, args.kv_cache)
    print(
        f"compiled {args.dist_dir} for {report['target']} -> {report['output']} "
        f"(export {report['export_s']:.1f} s, build {report['build_s']:.1f} s)"
    )
    for line in get_target(report["target"]).describe_build(report):
        print(line)


def cmd_package(args: argparse.Namespace) -> None:
    from .package import package

    out = package(args.config, args.output)
    print(f"packaged -> {out / 'bundle' / 'mlc-app-config.json'}, {out / 'lib' / 'libmodel_android.a'}")


def cmd_targets(args: argparse.Namespace) -> None:
    from .targets import TARGETS

    del args
    for target in TARGETS.values():
        missing = target.missing_codegen() or target.missing_toolchain()
        status = "buildable" if missing is None else f"not buildable here: {missing}"
        print(
            f"{target.name:<16}{target.library_suffix:<6}default {target.default_quantization:<9}{target.description}\n{'':<16}{status}"
        )
        for name, preset in target.cpus.items():
            runs = "" if target.emulated_triple is None else f", emulated on qemu -cpu {preset.emulator}"
            print(f"{'':<16}--cpu {name:<12}{preset.mcpu}: {preset.board}{runs}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.formats.library import inspect_library
    from mobilevlm_mlc.formats.mlc_contract import MLC_LLM_COMMIT
    from mobilevlm_mlc.formats.mlc_runtime import TVM_COMMIT

    report = inspect_library(args.library)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"{report.path}: {', '.join(report.machines)} objects; quantization {report.metadata.get('quantization')}")
    if report.system_lib_prefix:
        print(f"system-lib prefix: {report.system_lib_prefix}")
    print(f"build: {json.dumps(report.metadata.get('build', {}))}")
    for module in report.device_modules:
        images = f"; images {', '.join(map(str, module.images))}" if module.images else ""
        print(f"device module {module.kind} ({module.format}): {len(module.kernels) or '?'} kernels{images}")
    if report.oldest_cuda_driver:
        unnamed = any(i.cuda is None for m in report.device_modules for i in m.images)
        source = " (the build record's toolkit: a CUDA 12 cubin names no release)" if unnamed else ""
        print(f"oldest driver that loads it: CUDA {report.oldest_cuda_driver}{source}")
    functions = ", ".join(f"{name}/{arity}" for name, arity in sorted(report.vm_functions.items()))
    print(f"functions (name/arguments): {functions}")
    print(f"runtime functions called: {', '.join(report.runtime_functions)}")
    problems = report.contract_problems
    print(f"MLC engine contract (mlc-llm {MLC_LLM_COMMIT}): " + ("complete" if not problems else "; ".join(problems)))
    runtime = report.runtime_problems
    print(
        f"mlc4j's Android runtime (TVM as apache/tvm {TVM_COMMIT}): "
        + (f"all {len(report.runtime_calls)} runtime functions registered" if not runtime else "; ".join(runtime))
    )


def cmd_check_kernels(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.check.kernel_check import TOLERANCE, check_kernels

    from .fileio import check_output_file, write_json_atomic

    if args.output_json:
        check_output_file(args.output_json, "json", [args.dist_dir])

    def show(result) -> None:
        if not show.started:  # the header once the inputs were taken: a bad input prints its error line alone
            print(
                f"{'kernel':<64} {'status':<9} {'rel err':>8}  ({args.target} vs this host's CPU build, fp32 variant; tolerance {TOLERANCE:.0e})"
            )
            show.started = True
        error = f"{result.max_rel_error:.1e}" if result.status != "skipped" else "-"
        print(f"{result.name:<64} {result.status:<9} {error:>8} {result.seconds:5.1f} s  {result.detail}", flush=True)

    show.started = False
    only = args.kernels.split(",") if args.kernels else None
    results = check_kernels(
        args.dist_dir,
        args.target,
        entries=args.entries.split(","),
        only=only,
        progress=show,
        cpu=args.cpu,
        say=lambda step: print(f"[check-kernels] {step}", file=sys.stderr, flush=True),
    )
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "MISMATCH", "skipped")}
    print(f"{counts['ok']} ok, {counts['MISMATCH']} mismatched, {counts['skipped']} skipped")
    if args.output_json:
        write_json_atomic(args.output_json, json.dumps([vars(r) for r in results], indent=2), [args.dist_dir])
    if counts["MISMATCH"]:
        raise SystemExit(1)


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mobilevlm_mlc.bench.benchmark import BenchSettings, run_bench, write_result

    from .fileio import check_output_file

    if args.output:
        check_output_file(args.output, "json", [args.dist_dir, args.lib, args.image])
    settings = BenchSettings(
        args.prompt_lengths, args.decode_tokens, args.repeat, args.threads, args.warmup, args.batch
    )
    rpc = None
    if args.rpc_tracker or args.rpc_key:
        if not (args.rpc_tracker and args.rpc_key):
            raise MobileVLMError("--rpc-tracker and --rpc-key go together")
        rpc = (args.rpc_tracker, args.rpc_key)
    steps = 2 + len(settings.prompt_lengths) + 1
    with tqdm(total=steps, desc="bench", unit="step", leave=False) as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            bar.update(1)

        result = run_bench(
            args.dist_dir, args.lib, args.image, args.prompt, settings, args.device, rpc, args.label, progress
        )
    write_result(result, args.output)
    fmt = lambda s: f"{s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f})"  # noqa: E731
    print(
        f"{result['label']}  [{result['environment']['cpu']}, threads {result['environment']['threads'] or 'remote default'}]"
    )
    print(f"  image encode  {fmt(result['image_encode_ms'])} ms")
    for length, s in result["prefill_tok_s"].items():
        print(f"  prefill {result['settings']['image_tokens']}+{length:<5} {fmt(s)} tok/s")
    print(f"  decode        {fmt(result['decode_tok_s'])} tok/s")
    print(f"  TTFT          {fmt(result['ttft_ms'])} ms")
    if result["peak_rss_mib"]:
        print(f"  peak RSS      {result['peak_rss_mib']:.0f} MiB")
    if args.output:
        print(f"-> {args.output}")


def cmd_emulate(args: argparse.Namespace) -> None:
    from .emulation import emulated_device
    from .targets import get_target

    say = lambda step: print(f"[emulate] {step}", file=sys.stderr, flush=True)  # noqa: E731
    device = emulated_device(get_target(args.target), args.cpu, say, args.rpc_tracker, args.rpc_key)
    with device:
        print(
            f"an emulated {args.target} device (qemu-aarch64 -cpu {device.cpu}) serves TVM RPC on 127.0.0.1:{device.port}, "
            f"registered with {args.rpc_tracker} under key {args.rpc_key!r}; Ctrl-C stops it",
            flush=True,
        )
        while device.running():
            time.sleep(1)
        reason = device.last_line()
    raise MobileVLMError(f"the emulated RPC server exited: {reason}")


def cmd_compare(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.bench.compare import chart, load_results, table

    from .fileio import check_output_file

    if args.output:
        check_output_file(args.output, "png", args.results)
    results = load_results(args.results)
    print(table(results, args.baseline))
    if args.output:
        chart(results, args.output, args.baseline)
        print(f"chart -> {args.output}")


def cmd_run(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.runtime.engine import Engine

    from .fileio import check_output_file, write_json_atomic

    inputs = [args.dist_dir, args.lib, *([args.image] if args.image else [])]
    if args.output_json:  # before the answer is generated, so that a bad path loses nothing
        check_output_file(args.output_json, "json", inputs)
    config = _generation_config(args)
    engine = Engine(args.dist_dir, args.lib, device=args.device)
    with engine.chat() as session:
        for delta in session.send(args.prompt, args.image, config):
            print(delta, end="", flush=True)
        print()
        result = session.last
    if args.output_json:
        write_json_atomic(
            args.output_json,
            json.dumps(
                {
                    "prompt_token_ids": result.prompt_token_ids,
                    "output_token_ids": result.output_token_ids,
                    "first_logits": result.first_logits.astype(float).tolist(),
                    "finish_reason": result.finish_reason,
                }
            )
            + "\n",
            inputs,
        )


def cmd_chat(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.interactive import chat
    from mobilevlm_mlc.runtime.engine import Engine

    config = _generation_config(args)
    if args.image is not None and not args.image.is_file():
        raise MobileVLMError(f"{args.image}: image not found")
    chat(Engine(args.dist_dir, args.lib, device=args.device), config, args.image)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from mobilevlm_mlc.serve.app import ServerOptions, create_app
        from mobilevlm_mlc.serve.images import ImagePolicy
    except ImportError as err:
        raise MobileVLMError(
            f"serve needs the serve extra ({err.name} is missing): pip install 'mobilevlm-mlc[serve]'"
        ) from None
    import socket

    from mobilevlm_mlc.formats.dist import load_dist
    from mobilevlm_mlc.runtime.engine import Engine

    if args.allow_image_dir is not None and not args.allow_image_dir.is_dir():
        raise MobileVLMError(f"--allow-image-dir {args.allow_image_dir}: not a folder")
    try:  # the address first: a port in use is told before the model loads
        listener = socket.create_server((args.host, args.port))
    except OSError as err:  # create_server appends "(while attempting to bind ...)" to the system's reason
        reason = os.strerror(err.errno) if err.errno and err.errno > 0 else str(err.strerror).split(" (while")[0]
        raise MobileVLMError(f"--host {args.host} --port {args.port}: cannot listen there ({reason})") from None

    window = int(load_dist(args.dist_dir).chat_config["context_window_size"])
    engine = Engine(
        args.dist_dir,
        args.lib,
        device=args.device,
        max_sequences=args.max_sequences,
        kv_cache_tokens=args.kv_cache_tokens or 4 * window,
    )
    options = ServerOptions(
        model_id=args.model_id or args.dist_dir.resolve().name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        max_images=args.max_images,
        prefix_cache=args.prefix_cache,
        images=ImagePolicy(args.max_image_bytes, args.max_image_pixels, args.allow_image_dir),
    )
    port = listener.getsockname()[1]
    print(f"serving {options.model_id!r} on http://{args.host}:{port}/v1 (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, options), log_level="warning"))
    server.run(sockets=[listener])


def cmd_verify(args: argparse.Namespace) -> None:
    from mobilevlm_mlc.check.verify import verify

    report = verify(
        args.model_dir,
        image=args.image,
        prompt=args.prompt,
        tokens=args.tokens,
        workdir=args.workdir,
        quantization=args.quantization,
        target=args.target,
        cpu=args.cpu,
        progress=lambda step: print(f"[verify] {step}", file=sys.stderr, flush=True),
    )
    print(report.table())
    if not report.ok:
        raise SystemExit(1)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    demo(Path(args.workdir), args.projector, args.prompt, args.max_new_tokens)


CPU_HELP = "the core an Arm target is built for (`mobilevlm-mlc targets` lists each target's presets)"


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="mobilevlm-mlc", description="MobileVLM compiled with Apache TVM")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=argtypes.Parser)

    p = sub.add_parser("convert", help="checkpoint folder -> dist folder (weights, mlc-chat-config.json, tokenizer)")
    p.add_argument("model_dir", type=argtypes.path)
    p.add_argument("--quantization", required=True)
    p.add_argument("-o", "--output", type=argtypes.path, required=True)
    p.add_argument("--context-window-size", type=argtypes.positive, default=None)
    p.add_argument("--prefill-chunk-size", type=argtypes.positive, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compile", help="dist folder -> compiled library for a target")
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--target", type=argtypes.target, default="cpu")
    p.add_argument("--cpu", default=None, help=CPU_HELP)
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default="model",
        help="K and V in the model's dtype (default), or int8 with a scale per token and head: half the "
        "bytes each decode step reads (CPU targets)",
    )
    p.add_argument("-o", "--output", type=argtypes.path, required=True)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "package", help="mlc-package-config.json -> bundle/ and lib/libmodel_android.a for MLC's Android app"
    )
    p.add_argument("config", type=argtypes.path)
    p.add_argument("-o", "--output", type=argtypes.path, required=True)
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("inspect", help="what a compiled library holds: ELF machine, prefix, build info, device code")
    p.add_argument("library", type=argtypes.path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "check-kernels",
        help="run a phone build's kernels here (OpenCL on PoCL, Arm CPU under qemu-user) against the CPU build",
    )
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--target", type=argtypes.target, default="android-adreno")
    p.add_argument("--cpu", default=None, help=CPU_HELP)
    p.add_argument("--entries", default="decode,image_embed", help="entry points whose kernels are checked")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names instead")
    p.add_argument("--output-json", type=argtypes.path, default=None)
    p.set_defaults(func=cmd_check_kernels)

    p = sub.add_parser("bench", help="image encode, prefill, decode and time-to-first-token of a compiled library")
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--lib", type=argtypes.path, required=True)
    p.add_argument("--image", type=argtypes.path, default=DEMO_IMAGE)
    p.add_argument(
        "--prompt", type=argtypes.text, default=DEMO_PROMPT, help="the prompt of the time-to-first-token run"
    )
    p.add_argument(
        "--prompt-lengths", type=argtypes.lengths, default=(32, 128, 512), help="text tokens after the image tokens"
    )
    p.add_argument("--decode-tokens", type=argtypes.positive, default=128)
    p.add_argument("--batch", type=argtypes.integer(1, 64), default=1, help="sequences decoded together (batch_decode)")
    p.add_argument("--repeat", type=argtypes.positive, default=3)
    p.add_argument("--warmup", type=argtypes.count, default=1, help="untimed runs before the timed ones")
    p.add_argument("--threads", type=argtypes.positive, default=None)
    p.add_argument("--device", type=argtypes.device, default="cpu")
    p.add_argument("--label", type=argtypes.text, default=None)
    p.add_argument(
        "--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker: run on the device under --rpc-key"
    )
    p.add_argument("--rpc-key", default=None)
    p.add_argument("-o", "--output", type=argtypes.path, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="benchmark results side by side: a table with ratios, and a PNG chart")
    p.add_argument("results", type=argtypes.path, nargs="+")
    p.add_argument("--baseline", type=argtypes.count, default=0, help="index of the result the ratios are against")
    p.add_argument("-o", "--output", type=argtypes.path, default=None, help="PNG chart")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "emulate",
        help="an emulated Arm device (qemu-user) serving TVM RPC, registered with a tracker, as a phone would be",
    )
    p.add_argument("--target", type=argtypes.target, default="arm64-linux")
    p.add_argument("--cpu", default=None, help=CPU_HELP)
    p.add_argument("--rpc-tracker", required=True, help="HOST:PORT of the TVM RPC tracker to register with")
    p.add_argument("--rpc-key", required=True, type=argtypes.text, help="the key `bench --rpc-key` asks for")
    p.set_defaults(func=cmd_emulate)

    p = sub.add_parser("targets", help="list the build targets and whether this TVM can build each")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("run", help="answer a prompt about an image, streaming")
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--lib", type=argtypes.path, required=True)
    p.add_argument("--image", type=argtypes.path, default=None)
    p.add_argument("--prompt", type=argtypes.text, required=True)
    p.add_argument("--device", type=argtypes.device, default="cpu")
    p.add_argument("--output-json", type=argtypes.path, default=None)
    _add_generation_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (/help inside lists its commands)")
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--lib", type=argtypes.path, required=True)
    p.add_argument("--image", type=argtypes.path, default=None, help="attached to the first message")
    p.add_argument("--device", type=argtypes.device, default="cpu")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server (images, streaming, batching)")
    p.add_argument("dist_dir", type=argtypes.path)
    p.add_argument("--lib", type=argtypes.path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=argtypes.integer(0, 65535), default=8000)
    p.add_argument("--device", type=argtypes.device, default="cpu")
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: the dist folder's)")
    p.add_argument("--max-sequences", type=argtypes.positive, default=8, help="sequences decoded together")
    p.add_argument(
        "--kv-cache-tokens",
        type=argtypes.positive,
        default=None,
        help="tokens the paged KV cache holds for all sequences together (default: 4 context windows)",
    )
    p.add_argument("--max-waiting", type=argtypes.positive, default=64, help="queued requests before 429")
    p.add_argument(
        "--prefix-cache",
        type=argtypes.integer(0, 1024),
        default=8,
        help="finished sequences kept in the KV cache, so that requests beginning the same (the system prompt, "
        "a chat's earlier turns and image) skip that part of the prefill; 0: off",
    )
    p.add_argument(
        "--api-key", type=argtypes.api_key, default=None, help="require 'Authorization: Bearer KEY' (all but /health)"
    )
    p.add_argument("--allow-image-dir", type=argtypes.path, default=None, help="image_url paths allowed under it")
    p.add_argument("--max-images", type=argtypes.positive, default=1, help="images per request")
    p.add_argument("--max-image-bytes", type=argtypes.positive, default=10 * 2**20)
    p.add_argument("--max-image-pixels", type=argtypes.positive, default=4096 * 4096)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="compare the compiled model with the PyTorch reference, boundary by boundary")
    p.add_argument("model_dir", type=argtypes.path)
    p.add_argument("--image", type=argtypes.path, default=DEMO_IMAGE)
    p.add_argument("--prompt", type=argtypes.text, default=DEMO_PROMPT)
    p.add_argument("--tokens", type=argtypes.positive, default=16, help="greedy tokens that must agree")
    p.add_argument("--quantization", default="q0f32")
    p.add_argument(
        "--target",
        type=argtypes.target,
        default="cpu",
        help="cpu (this host) or arm64-linux (run under qemu-user: the AArch64 code itself)",
    )
    p.add_argument("--cpu", default=None, help=CPU_HELP)
    p.add_argument(
        "--workdir", type=argtypes.path, default=None, help="where to keep the converted weights and library"
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="build a small random-weight MobileVLM, compile it for this CPU and chat with it")
    p.add_argument("--projector", choices=["ldpnet", "ldpnetv2"], default="ldpnet")
    p.add_argument("--workdir", type=argtypes.path, default=Path("dist/demo"))
    p.add_argument("--prompt", type=argtypes.text, default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=argtypes.positive, default=24)
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from mobilevlm_mlc import __version__

    try:
        tvm_version = version("apache-tvm")
    except PackageNotFoundError:
        tvm_version = "not installed"
    return f"mobilevlm-mlc {__version__} (apache-tvm {tvm_version})"


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally` removes its temporaries."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see `run`."""
    args = build_parser().parse_args(argv)
    return run(args.command, lambda: args.func(args))


def run(name: str, command: Callable[[], None]) -> int:
    """`command` behind the one error path every entry point shares (the CLI, the benchmarks). Exit
    codes: 0 done; 1 a check failed (verify, check-kernels) or an internal error; 2 bad input (one
    `error:` line); 130 / 143 interrupted / terminated (temporaries removed); 141 stdout closed."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            command()
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except MobileVLMError as err:
            argtypes.print_error(str(err))
            return 2
        except MemoryError:
            argtypes.print_error(f"out of memory during `{name}` (a smaller model, context window or image needs less)")
            return 2
        except Exception as err:
            if os.environ.get("MOBILEVLM_MLC_DEBUG"):
                raise
            argtypes.print_error(
                f"internal error in `{name}`: {first_line(err)} (set MOBILEVLM_MLC_DEBUG=1 for the traceback; please report it)"
            )
            return 1
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
