"""This project against its peers, in one run, on the same random weights and prompt lengths:
mobilevlm-mlc (`cpu` builds), PyTorch eager (transformers; fp32, bf16), llama.cpp (llama-cpp-python
built with native CPU flags; GGUF written from the same weights as F16, quantized to Q4_0 and Q4_K_S)
and ONNX Runtime GenAI int4 (peer `onnxruntime-genai-int4`: its model builder's `-p int4 -e cpu`
MatMulNBits model of the same decoder, written as a Llama folder). The builder needs transformers >= 5,
so ONNX Runtime GenAI lives in its own environment (`--ort-venv`, default `.venv-ort`):

    python3 -m venv .venv-ort && .venv-ort/bin/pip install torch==2.13.0 onnxruntime-genai \
        "transformers>=5" onnx_ir onnx safetensors sentencepiece protobuf

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e ".[bench,peers]"
    python benchmarks/peers.py --size 1.7b --threads 2 --out benchmarks/results/peers-1.7b

Each engine runs in its own process (so its peak memory is its own) and writes a result in `bench`'s
schema; then `compare` prints the table and draws the chart. llama.cpp gets the same number of tokens
as text (it has no MobileVLM image path here): its image-encode and TTFT cells stay empty. The script
also measures this machine's memory bandwidth (a STREAM-style read) and prints each decode rate as a
fraction of the bandwidth limit (bytes of weights read per token / bandwidth).

On an NVIDIA GPU (`benchmarks/gpu_check.sh` runs this): `--target cuda --device cuda --peers pytorch-fp16`
builds ours for `cuda`, runs it and PyTorch fp16 eager on the GPU (no CPU bandwidth line then).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mobilevlm_mlc import arguments as argtypes
from mobilevlm_mlc.bench.benchmark import SCHEMA, BenchSettings, check_fits, environment, peak_rss_mib, summary, timed
from mobilevlm_mlc.check.synthetic import SHAPES
from mobilevlm_mlc.cli import run

ROOT = Path(__file__).resolve().parent.parent
LLAMA_FTYPES = {"Q4_0": 2, "Q4_K_S": 14}  # llama.h LLAMA_FTYPE_MOSTLY_*


# ---------------------------------------------------------------- memory bandwidth


def stream_read_gb_s(threads: int, gib: float = 1.0, repeat: int = 5) -> float:
    """Best read bandwidth over `repeat` passes: `threads` threads each summing their slice of a
    `gib` GiB float32 array (numpy releases the GIL in the reduction)."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    slices = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeat):
        workers = [threading.Thread(target=np.add.reduce, args=(s,)) for s in slices]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - started) / 1e9)
    return best


def decoder_bytes_per_token(dist: Path | None = None, gguf: Path | None = None) -> int | None:
    """Bytes of weights one decode step reads: every decoder weight but the embedding table."""
    if dist is not None:
        cache = json.loads((dist / "tensor-cache.json").read_text())
        return sum(
            r["nbytes"]
            for shard in cache["records"]
            for r in shard["records"]
            if r["name"].startswith(("model.layers.", "model.norm", "lm_head"))
        )
    if gguf is not None:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    return None


# ---------------------------------------------------------------- PyTorch eager


def bench_pytorch(
    checkpoint: Path, dtype_name: str, image: Path, prompt: str, settings: BenchSettings, device: str = "cpu"
) -> dict:
    import torch
    from PIL import Image

    from mobilevlm_mlc.check.reference import ReferenceMobileVLM

    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    ref = ReferenceMobileVLM(checkpoint, dtype=dtype, device=device)
    on_gpu = ref.device.type == "cuda"

    def synced(fn):  # a GPU call is timed to its end, not to its launch
        return (lambda: (fn(), torch.cuda.synchronize())) if on_gpu else fn

    image_tokens = ref.config.num_image_tokens
    check_fits(settings, image_tokens, ref.config.context_window_size)
    rng = np.random.default_rng(0)
    vocab = ref.config.text.vocab_size
    pixels = ref.pixels(Image.open(image).convert("RGB"))
    image_embeds = ref.image_embeds(pixels)
    embed = ref.llm.get_input_embeddings()

    encode = timed(synced(lambda: ref.image_embeds(pixels)), settings.repeat, settings.warmup)
    prefill = {}
    with torch.no_grad():
        for length in settings.prompt_lengths:
            text = torch.tensor(rng.integers(3, vocab, length), device=ref.device)
            embeds = torch.cat([image_embeds, embed(text)])[None]
            runs = timed(
                synced(lambda e=embeds: ref.llm(inputs_embeds=e, use_cache=True)), settings.repeat, settings.warmup
            )
            prefill[str(length)] = summary([embeds.shape[1] / s for s in runs])
        text = torch.tensor(rng.integers(3, vocab, min(settings.prompt_lengths)), device=ref.device)
        context = torch.cat([image_embeds, embed(text)])[None]
        decode = []
        for _ in range(settings.warmup + settings.repeat):
            out = ref.llm(inputs_embeds=context, use_cache=True)
            logits, past = out.logits[0, -1], out.past_key_values
            synced(lambda: None)()
            started = time.perf_counter()
            for _ in range(settings.decode_tokens):
                out = ref.llm(input_ids=torch.argmax(logits).view(1, 1), past_key_values=past, use_cache=True)
                logits, past = out.logits[0, -1], out.past_key_values
            synced(lambda: None)()
            decode.append(settings.decode_tokens / (time.perf_counter() - started))

        def first_token() -> int:
            ids = ref.input_ids(f"<image>\n{prompt}")
            embeds = ref.input_embeds(ids, ref.image_embeds(ref.pixels(Image.open(image).convert("RGB"))))
            return int(torch.argmax(ref.llm(inputs_embeds=embeds).logits[0, -1]))

        ttft = timed(first_token, settings.repeat, settings.warmup)
    return {
        "label": f"pytorch eager {dtype_name}" + (" (cuda)" if on_gpu else ""),
        "engine": "pytorch",
        "quantization": dtype_name,
        "image_encode_ms": summary([s * 1000 for s in encode]),
        "prefill_tok_s": prefill,
        "decode_tok_s": summary(decode[settings.warmup :]),
        "ttft_ms": summary([s * 1000 for s in ttft]),
        "settings": settings.to_dict(image_tokens),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(ref.device) if on_gpu else "cpu",
    }


# ---------------------------------------------------------------- our builds


def synthetic_build(
    workdir: Path, size: str, quantization: str, target: str = "cpu", kv_cache: str = "model"
) -> tuple[Path, Path, Path]:
    """(checkpoint, dist, library) of a random-weight checkpoint of `size` in `workdir`: the checkpoint and
    weights made once and reused, the library built every time (it reflects this code), its KV cache in
    `kv_cache` (`compile --kv-cache`)."""
    from mobilevlm_mlc.check.synthetic import make_checkpoint
    from mobilevlm_mlc.compiler import compile_model
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.formats.manifest import MANIFEST

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / f"ckpt-{size}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, "ldpnet", size=size)
    dist = workdir / f"{size}-{quantization}"
    lib = workdir / f"{size}-{quantization}-{target}{'' if kv_cache == 'model' else '-kv-' + kv_cache}.so"
    if not (dist / MANIFEST).exists():
        convert(checkpoint, dist, quantization, progress=False)
    compile_model(dist, target, lib, kv_cache=kv_cache)
    return checkpoint, dist, lib


# ---------------------------------------------------------------- llama.cpp


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGML's interleaved pairs (as llama.cpp's own converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_f16(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's MobileLLaMA decoder as an F16 GGUF (the vision tower and projector are not used)."""
    import gguf
    import sentencepiece

    from mobilevlm_mlc.convert.checkpoint import CheckpointTensors, load_config

    config = load_config(checkpoint).text
    tensors = CheckpointTensors(checkpoint)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("MobileLLaMA (random weights)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    kinds = []
    for i in range(sp.get_piece_size()):
        kinds.append(
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.NORMAL
        )
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())

    def f16(name: str) -> np.ndarray:
        return tensors.get(name).astype(np.float16)

    def f32(name: str) -> np.ndarray:
        return tensors.get(name).astype(np.float32)

    writer.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", f32("model.norm.weight"))
    writer.add_tensor("output.weight", f16("lm_head.weight"))
    names = {
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", f32(hf + "input_layernorm.weight"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", f32(hf + "post_attention_layernorm.weight"))
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_rope(f16(hf + "self_attn.q_proj.weight"), config.num_attention_heads)
        )
        k = f16(hf + "self_attn.k_proj.weight")
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute_rope(k, config.num_key_value_heads))
        for ours, theirs in names.items():
            if ours != "attn_k":
                writer.add_tensor(f"blk.{i}.{ours}.weight", f16(hf + theirs + ".weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize_gguf(f16: Path, out: Path, ftype: str, threads: int) -> Path:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp failed to quantize {f16} to {ftype}")
    return out


def gguf_for(checkpoint: Path, workdir: Path, size: str, ftype: str, threads: int) -> Path:
    """The GGUF of `checkpoint`'s decoder in `ftype` (F16, or llama.cpp's own quantization of it), made
    once in `workdir` and reused."""
    f16 = workdir / f"{size}-F16.gguf"
    if not f16.exists():
        write_gguf_f16(checkpoint, f16)
    if ftype == "F16":
        return f16
    out = workdir / f"{size}-{ftype}.gguf"
    return out if out.exists() else quantize_gguf(f16, out, ftype, threads)


def bench_llama_cpp(gguf_path: Path, label: str, image_tokens: int, settings: BenchSettings) -> dict:
    from llama_cpp import Llama

    threads = settings.threads or None
    llm = Llama(str(gguf_path), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prefill = {}
    for length in settings.prompt_lengths:
        tokens = rng.integers(3, vocab, image_tokens + length).tolist()

        def run(t=tokens) -> None:
            llm.reset()
            llm.eval(t)

        prefill[str(length)] = summary([len(tokens) / s for s in timed(run, settings.repeat, settings.warmup)])
    context = rng.integers(3, vocab, image_tokens + min(settings.prompt_lengths)).tolist()
    decode = []
    for _ in range(settings.warmup + settings.repeat):
        llm.reset()
        llm.eval(context)
        started = time.perf_counter()
        for step in range(settings.decode_tokens):
            llm.eval([3 + step])
        decode.append(settings.decode_tokens / (time.perf_counter() - started))
    return {
        "label": label,
        "engine": "llama.cpp",
        "quantization": label.split()[-1],
        "prefill_tok_s": prefill,
        "decode_tok_s": summary(decode[settings.warmup :]),
        "settings": settings.to_dict(image_tokens),
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }


def bench_llama_cpp_batched(
    gguf_path: Path, label: str, image_tokens: int, settings: BenchSettings, batch: int
) -> dict:
    """llama.cpp's multi-sequence decode, as its server runs parallel requests: `batch` sequences in one
    context (one KV stream each), each prefilled with the same context length as ours, then one
    `llama_decode` per step carrying one token of every sequence. Decode tok/s is the sum over the batch."""
    import llama_cpp as lc

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its C log goes through this logger
    context = image_tokens + min(settings.prompt_lengths)
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx = batch * (context + settings.decode_tokens + 16)
    params.n_batch = params.n_ubatch = max(context, batch)
    params.n_seq_max = batch
    params.kv_unified = False  # each sequence its own KV stream: they share no prefix
    params.n_threads = params.n_threads_batch = settings.threads or 2
    ctx = lc.llama_init_from_model(model, params)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    tokens = lc.llama_batch_init(max(context, batch), 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        tokens.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            tokens.token[i], tokens.pos[i], tokens.n_seq_id[i], tokens.logits[i] = token, pos, 1, logits
            tokens.seq_id[i][0] = seq
        if lc.llama_decode(ctx, tokens) != 0:
            raise RuntimeError(f"llama_decode failed ({len(entries)} tokens)")

    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, context).tolist()
    rates = []
    try:
        for _ in range(settings.warmup + settings.repeat):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            for seq in range(batch):
                decode([(t, p, seq, p == context - 1) for p, t in enumerate(prompt)])
            lc.llama_synchronize(ctx)
            started = time.perf_counter()
            for step in range(settings.decode_tokens):
                decode([(3 + step, context + step, seq, True) for seq in range(batch)])
                lc.llama_get_logits(ctx)  # (the step's logits, as a caller would read them)
            lc.llama_synchronize(ctx)
            rates.append(batch * settings.decode_tokens / (time.perf_counter() - started))
    finally:
        lc.llama_batch_free(tokens)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return {
        "label": label,
        "engine": "llama.cpp",
        "quantization": label.split()[1],
        "decode_tok_s": summary(rates[settings.warmup :]),
        "settings": settings.to_dict(image_tokens) | {"batch": batch},
        "llama_cpp_python": lc.__version__,
    }


# ---------------------------------------------------------------- ONNX Runtime GenAI


def write_hf_llama(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's MobileLLaMA decoder as a plain `LlamaForCausalLM` folder (config, safetensors,
    tokenizer): what ONNX Runtime GenAI's model builder reads. The vision tower and projector are left out."""
    import shutil

    from safetensors.numpy import save_file

    from mobilevlm_mlc.convert.checkpoint import CheckpointTensors, load_config

    text = load_config(checkpoint).text
    out.mkdir(parents=True, exist_ok=True)
    tensors = CheckpointTensors(checkpoint)
    decoder = [
        n for n in tensors.names() if n.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))
    ]
    save_file({n: tensors.get(n).astype(np.float32) for n in decoder}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta,
        "vocab_size": text.vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, out / name)
    return out


def bench_ort_genai(venv_python: Path, model_dir: Path, image_tokens: int, settings: BenchSettings) -> dict:
    """`ort_genai_peer.py run` in ONNX Runtime GenAI's own environment; its figures as a `bench` result."""
    out = subprocess.run(
        [str(venv_python), str(ROOT / "benchmarks" / "ort_genai_peer.py"), "run", str(model_dir),
         "--image-tokens", str(image_tokens), "--prompt-lengths", ",".join(map(str, settings.prompt_lengths)),
         "--decode-tokens", str(settings.decode_tokens), "--repeat", str(settings.repeat), "--warmup", str(settings.warmup)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "label": "onnxruntime-genai int4",
        "engine": "onnxruntime-genai",
        "quantization": "int4 (MatMulNBits, builder -p int4 -e cpu)",
        **figures,
        "settings": settings.to_dict(image_tokens),
    }


# ---------------------------------------------------------------- orchestration


def run_one(args: argparse.Namespace) -> None:
    """Child process: one engine, one result file (its own peak memory)."""
    settings = BenchSettings(tuple(args.prompt_lengths), args.decode_tokens, args.repeat, args.threads, args.warmup)
    if args.one.startswith("pytorch-"):
        result = bench_pytorch(
            args.checkpoint, args.one.split("-", 1)[1], args.image, args.prompt, settings, args.device
        )
    else:
        from mobilevlm_mlc.convert.checkpoint import load_config

        image_tokens = load_config(args.checkpoint).num_image_tokens
        label = f"llama.cpp {args.one.split('-', 1)[1]}"
        if args.batch is not None:
            result = bench_llama_cpp_batched(
                args.gguf, f"{label} batch {args.batch}", image_tokens, settings, args.batch
            )
        else:
            result = bench_llama_cpp(args.gguf, label, image_tokens, settings)
    result |= {"schema": SCHEMA, "environment": environment(args.threads), "peak_rss_mib": peak_rss_mib()}
    args.result.write_text(json.dumps(result, indent=2))


def _ort_genai_result(checkpoint: Path, args: argparse.Namespace, out: Path) -> Path:
    """ONNX Runtime GenAI on the same decoder weights: the Llama folder, its builder's int4 model (both
    kept in the workdir), then the run, in the environment `--ort-venv` names."""
    from mobilevlm_mlc.convert.checkpoint import load_config

    python = args.ort_venv / "bin" / "python"
    model = args.workdir / f"{args.size}-ort-int4"
    if not (model / "genai_config.json").exists():
        hf = write_hf_llama(checkpoint, args.workdir / f"{args.size}-hf-llama")
        script = ROOT / "benchmarks" / "ort_genai_peer.py"
        subprocess.run(
            [str(python), str(script), "build", str(hf), str(model), "--threads", str(args.threads)], check=True
        )
    settings = BenchSettings(tuple(args.prompt_lengths), args.decode_tokens, args.repeat, args.threads, args.warmup)
    result = bench_ort_genai(python, model, load_config(checkpoint).num_image_tokens, settings)
    result |= {"schema": SCHEMA, "environment": environment(args.threads), "peak_rss_mib": None}
    out.write_text(json.dumps(result, indent=2))
    return out


def main() -> None:
    from mobilevlm_mlc.demo import DEMO_IMAGE, DEMO_PROMPT

    parser = argtypes.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1.7b", help="synthetic checkpoint size")
    parser.add_argument(
        "--checkpoint", type=argtypes.path, default=None, help="use this checkpoint instead of a synthetic one"
    )
    parser.add_argument("--threads", type=argtypes.positive, default=2)
    parser.add_argument("--prompt-lengths", type=argtypes.lengths, default=(128, 512))
    parser.add_argument("--decode-tokens", type=argtypes.positive, default=64)
    parser.add_argument("--repeat", type=argtypes.positive, default=2)
    parser.add_argument("--warmup", type=argtypes.count, default=1)
    parser.add_argument("--quantizations", default="q4f16_3", help="our builds (of --target)")
    parser.add_argument("--target", default="cpu", help="our builds' target (cuda: with --device cuda)")
    parser.add_argument("--device", default="cpu", help="where ours and PyTorch run (cpu, cuda)")
    parser.add_argument("--peers", default="pytorch-fp32,pytorch-bf16,llama.cpp-F16,llama.cpp-Q4_0,llama.cpp-Q4_K_S")
    parser.add_argument("--workdir", type=argtypes.folder, default=ROOT / "dist" / "peers")
    parser.add_argument("--out", type=argtypes.folder, default=ROOT / "benchmarks" / "results" / "peers")
    parser.add_argument("--image", type=argtypes.path, default=DEMO_IMAGE)
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument(
        "--ort-venv",
        type=argtypes.path,
        default=ROOT / ".venv-ort",
        help="ONNX Runtime GenAI's environment (peer onnxruntime-genai-int4)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=argtypes.path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=argtypes.path, default=None, help=argparse.SUPPRESS)
    # llama.cpp multi-sequence decode
    parser.add_argument("--batch", type=argtypes.positive, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "onnxruntime-genai-int4" in args.peers.split(",") and not (args.ort_venv / "bin" / "python").exists():
        parser.error(f"--ort-venv {args.ort_venv}: no Python there for peer onnxruntime-genai-int4 (see the docstring)")
    if args.one:
        run_one(args)
        return

    from mobilevlm_mlc.check.synthetic import make_checkpoint
    from mobilevlm_mlc.compiler import compile_model
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.formats.manifest import MANIFEST

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or args.workdir / f"ckpt-{args.size}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, "ldpnet", size=args.size)
    common = [
        "--prompt-lengths",
        ",".join(map(str, args.prompt_lengths)),
        "--decode-tokens",
        str(args.decode_tokens),
        "--repeat",
        str(args.repeat),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    results, bytes_per_token = [], {}
    for quantization in filter(None, args.quantizations.split(",")):
        dist = args.workdir / f"{args.size}-{quantization}"
        lib = args.workdir / f"{args.size}-{quantization}-{args.target}.so"
        if not (dist / MANIFEST).exists():  # weights are reused; the library always reflects this code
            convert(checkpoint, dist, quantization, progress=False)
        compile_model(dist, args.target, lib)
        out = args.out / f"mobilevlm-mlc-{quantization}.json"
        print(f"== mobilevlm-mlc {quantization}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mobilevlm_mlc.cli",
                "bench",
                str(dist),
                "--lib",
                str(lib),
                "--device",
                args.device,
                "--image",
                str(args.image),
                *common,
                "-o",
                str(out),
            ],
            check=True,
        )
        results.append(out)
        bytes_per_token[out] = decoder_bytes_per_token(dist=dist)
    for peer in filter(None, args.peers.split(",")):
        out = args.out / f"{peer}.json"
        if peer == "onnxruntime-genai-int4":
            print(f"== {peer}", flush=True)
            results.append(_ort_genai_result(checkpoint, args, out))
            continue
        extra = []
        if peer.startswith("llama.cpp-"):
            gguf_path = gguf_for(checkpoint, args.workdir, args.size, peer.split("-", 1)[1], args.threads)
            extra = ["--gguf", str(gguf_path)]
            bytes_per_token[out] = decoder_bytes_per_token(gguf=gguf_path)
        print(f"== {peer}", flush=True)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                peer,
                "--checkpoint",
                str(checkpoint),
                "--result",
                str(out),
                "--image",
                str(args.image),
                "--prompt",
                args.prompt,
                "--device",
                args.device,
                *common,
                *extra,
            ],
            check=True,
        )
        results.append(out)

    if args.device != "cpu":  # the bandwidth limit below is the CPU's
        bytes_per_token.clear()
    bandwidth = stream_read_gb_s(args.threads) if bytes_per_token else 0.0
    if bandwidth:
        print(f"\nmemory bandwidth (STREAM-style read, {args.threads} threads): {bandwidth:.1f} GB/s")
    for path in results:
        result = json.loads(path.read_text())
        per_token = bytes_per_token.get(path)
        if per_token:
            limit = bandwidth * 1e9 / per_token
            result["bandwidth"] = {
                "read_gb_s": bandwidth,
                "bytes_per_token": per_token,
                "decode_limit_tok_s": limit,
                "fraction_of_limit": result["decode_tok_s"]["median"] / limit,
            }
            path.write_text(json.dumps(result, indent=2))
            print(
                f"  {result['label']:<28} decode {result['decode_tok_s']['median']:7.2f} tok/s = "
                f"{100 * result['bandwidth']['fraction_of_limit']:5.1f}% of the {limit:.1f} tok/s limit ({per_token / 2**20:.0f} MiB/token)"
            )
    print()
    subprocess.run(
        [sys.executable, "-m", "mobilevlm_mlc.cli", "compare", *map(str, results), "-o", str(args.out / "chart.png")],
        check=True,
    )


if __name__ == "__main__":
    sys.exit(run("peers", main))
