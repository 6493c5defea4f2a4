"""`mobilevlm-mlc` command line: convert, compile, run, verify, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .demo import DEMO_IMAGE, DEMO_PROMPT
from .errors import MobileVLMError



def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _generation_config(args: argparse.Namespace):
    from .sampling import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    started = time.perf_counter()
    out = convert(
        args.model_dir, args.output, args.quantization,
        context_window_size=args.context_window_size, prefill_chunk_size=args.prefill_chunk_size,
        progress=not args.quiet,
    )
    print(f"converted {args.model_dir} -> {out} ({args.quantization}) in {time.perf_counter() - started:.1f} s")


def cmd_compile(args: argparse.Namespace) -> None:
    from .compiler import compile_model

    report = compile_model(args.dist_dir, args.target, args.output)
    print(
        f"compiled {args.dist_dir} for {report['target']} -> {report['output']} "
        f"(export {report['export_s']:.1f} s, build {report['build_s']:.1f} s)"
    )
    build = report["build"]
    if "cuda_toolkit" in build:
        print(f"device code: {build['device_code']} for {', '.join(build['cuda_archs'])} + {build['ptx']} PTX, "
              f"CUDA {build['cuda_toolkit']} (needs a driver that supports it)")
    if report["system_lib_prefix"]:
        print(f"system library: model_lib '{report['system_lib_prefix'].rstrip('_')}' (symbol prefix {report['system_lib_prefix']})")


def cmd_package(args: argparse.Namespace) -> None:
    from .package import package

    out = package(args.config, args.output)
    print(f"packaged -> {out / 'bundle' / 'mlc-app-config.json'}, {out / 'lib' / 'libmodel_android.a'}")


def cmd_targets(args: argparse.Namespace) -> None:
    from targets import TARGETS

    del args
    for target in TARGETS.values():
        missing = target.missing_codegen() or target.missing_toolchain()
        status = "buildable" if missing is None else f"not buildable here: {missing}"
        print(f"{target.name:<16}{target.library_suffix:<6}default {target.default_quantization:<9}{target.description}\n{'':<16}{status}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .artifact import inspect_library

    report = inspect_library(args.library)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"{report.path}: {', '.join(report.machines)} objects; quantization {report.metadata.get('quantization')}")
    if report.system_lib_prefix:
        print(f"system-lib prefix: {report.system_lib_prefix}")
    print(f"build: {json.dumps(report.metadata.get('build', {}))}")
    for module in report.device_modules:
        images = f"; images {', '.join(f'{k} {a}' for k, a in module.images)}" if module.images else ""
        print(f"device module {module.kind} ({module.format}): {len(module.kernels) or '?'} kernels{images}")


def cmd_check_kernels(args: argparse.Namespace) -> None:
    from .kernel_check import TOLERANCE, check_kernels

    def show(result) -> None:
        error = f"{result.max_rel_error:.1e}" if result.status != "skipped" else "-"
        print(f"{result.name:<64} {result.status:<9} {error:>8} {result.seconds:5.1f} s  {result.detail}", flush=True)

    only = args.kernels.split(",") if args.kernels else None
    print(f"{'kernel':<64} {'status':<9} {'rel err':>8}  (OpenCL on PoCL vs the CPU build, fp32 variant; tolerance {TOLERANCE:.0e})")
    results = check_kernels(args.dist_dir, args.target, entries=args.entries.split(","), only=only, progress=show)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "MISMATCH", "skipped")}
    print(f"{counts['ok']} ok, {counts['MISMATCH']} mismatched, {counts['skipped']} skipped")
    if args.output_json:
        args.output_json.write_text(json.dumps([vars(r) for r in results], indent=2))
    if counts["MISMATCH"]:
        raise SystemExit(1)


def _lengths(value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {value!r}")
    return lengths


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .bench import BenchSettings, run_bench, write_result

    settings = BenchSettings(args.prompt_lengths, args.decode_tokens, args.repeat, args.threads, args.warmup)
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

        result = run_bench(args.dist_dir, args.lib, args.image, args.prompt, settings, args.device, rpc, args.label, progress)
    write_result(result, args.output)
    fmt = lambda s: f"{s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f})"  # noqa: E731
    print(f"{result['label']}  [{result['environment']['cpu']}, threads {settings.threads or 'default'}]")
    print(f"  image encode  {fmt(result['image_encode_ms'])} ms")
    for length, s in result["prefill_tok_s"].items():
        print(f"  prefill {result['settings']['image_tokens']}+{length:<5} {fmt(s)} tok/s")
    print(f"  decode        {fmt(result['decode_tok_s'])} tok/s")
    print(f"  TTFT          {fmt(result['ttft_ms'])} ms")
    if result["peak_rss_mib"]:
        print(f"  peak RSS      {result['peak_rss_mib']:.0f} MiB")
    if args.output:
        print(f"-> {args.output}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import chart, load_results, table

    results = load_results(args.results)
    print(table(results, args.baseline))
    if args.output:
        chart(results, args.output, args.baseline)
        print(f"chart -> {args.output}")


def cmd_run(args: argparse.Namespace) -> None:
    from .engine import Engine

    engine = Engine(args.dist_dir, args.lib, device=args.device)
    config = _generation_config(args)
    with engine.chat() as session:
        for delta in session.send(args.prompt, args.image, config):
            print(delta, end="", flush=True)
        print()
        result = session.last
    if args.output_json:
        from .fileio import atomic_file

        with atomic_file(Path(args.output_json)) as tmp:
            tmp.write_text(json.dumps({
                "prompt_token_ids": result.prompt_token_ids,
                "output_token_ids": result.output_token_ids,
                "first_logits": result.first_logits.astype(float).tolist(),
                "finish_reason": result.finish_reason,
            }) + "\n")


def cmd_verify(args: argparse.Namespace) -> None:
    from .verify import verify

    report = verify(
        args.model_dir, image=args.image, prompt=args.prompt, tokens=args.tokens,
        workdir=args.workdir, quantization=args.quantization,
    )
    print(report.table())
    if not report.ok:
        raise SystemExit(1)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    demo(Path(args.workdir), args.projector, args.prompt, args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilevlm-mlc", description="MobileVLM compiled with Apache TVM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="checkpoint folder -> dist folder (weights, mlc-chat-config.json, tokenizer)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--quantization", required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--context-window-size", type=_positive, default=None)
    p.add_argument("--prefill-chunk-size", type=_positive, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compile", help="dist folder -> compiled library for a target")
    p.add_argument("dist_dir", type=Path)
    p.add_argument("--target", default="cpu")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("package", help="mlc-package-config.json -> bundle/ and lib/libmodel_android.a for MLC's Android app")
    p.add_argument("config", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("inspect", help="what a compiled library holds: ELF machine, prefix, build info, device code")
    p.add_argument("library", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check-kernels", help="run an OpenCL build's kernels on this CPU (PoCL) against the CPU build")
    p.add_argument("dist_dir", type=Path)
    p.add_argument("--target", default="android-adreno")
    p.add_argument("--entries", default="decode,image_embed", help="entry points whose kernels are checked")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names instead")
    p.add_argument("--output-json", type=Path, default=None)
    p.set_defaults(func=cmd_check_kernels)

    p = sub.add_parser("bench", help="image encode, prefill, decode and time-to-first-token of a compiled library")
    p.add_argument("dist_dir", type=Path)
    p.add_argument("--lib", type=Path, required=True)
    p.add_argument("--image", type=Path, default=DEMO_IMAGE)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt of the time-to-first-token run")
    p.add_argument("--prompt-lengths", type=_lengths, default=(32, 128, 512), help="text tokens after the image tokens")
    p.add_argument("--decode-tokens", type=_positive, default=128)
    p.add_argument("--repeat", type=_positive, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--threads", type=_positive, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default=None)
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker: run on the device under --rpc-key")
    p.add_argument("--rpc-key", default=None)
    p.add_argument("-o", "--output", type=Path, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="benchmark results side by side: a table with ratios, and a PNG chart")
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--baseline", type=int, default=0, help="index of the result the ratios are against")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG chart")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("targets", help="list the build targets and whether this TVM can build each")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("run", help="answer a prompt about an image, streaming")
    p.add_argument("dist_dir", type=Path)
    p.add_argument("--lib", type=Path, required=True)
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-json", type=Path, default=None)
    _add_generation_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="compare the compiled model with the PyTorch reference, boundary by boundary")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--image", type=Path, default=DEMO_IMAGE)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--tokens", type=_positive, default=16, help="greedy tokens that must agree")
    p.add_argument("--quantization", default="q0f32")
    p.add_argument("--workdir", type=Path, default=None, help="where to keep the converted weights and library")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="build a small random-weight MobileVLM, compile it for this CPU and chat with it")
    p.add_argument("--projector", choices=["ldpnet", "ldpnetv2"], default="ldpnet")
    p.add_argument("--workdir", type=Path, default=Path("dist/demo"))
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=_positive, default=24)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MobileVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
