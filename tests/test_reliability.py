"""Reliability (issue 7): long sessions (resident memory, KV pages, the context window), several
sequences in one KV cache, reproducible builds and the dist manifest, and user paths that never reach
a shell nor lead a write outside the output folder.

Everything runs on the session's tiny ldpnet build; only the reproducibility test compiles (once)."""

from __future__ import annotations

import ast
import gc
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.formats.dist import load_dist
from mobilevlm_mlc.formats.library import inspect_library
from mobilevlm_mlc.formats.manifest import MANIFEST, check_library, sha256_file
from mobilevlm_mlc.package import package
from mobilevlm_mlc.runtime.conversation import IMAGE_TOKEN_ID, Conversation, tokenize_with_images
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig

from .helpers import DEMO_IMAGE, REL_TOL, reference_for, rel_err, write_config

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 512
HOSTILE = "we ird; $(touch pwned) `touch pwned2` 'q\" -x"  # what a shell would act on


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS), after a collection so that garbage does not count."""
    gc.collect()
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def small_window(ldpnet_built) -> Engine:
    """The shared tiny build with a 512-token window: chats reach it every few dozen turns, cheaply."""
    return Engine(ldpnet_built.dist, ldpnet_built.lib, context_window_size=WINDOW)


# ---- long sessions ----------------------------------------------------------------------------------


def test_long_sessions_keep_memory_and_kv_pages(small_window):
    """200 turns in one chat (which meets the window again and again) and 50 sessions opened and closed:
    resident memory grows < 5% after warm-up and every KV page comes back."""
    engine, config = small_window, GenerationConfig(max_new_tokens=2)
    pages = engine.free_kv_tokens()
    drops = []
    with engine.chat() as chat:
        for i in range(200):
            list(chat.send(f"Q{i}?", None, config))
            assert chat.length < WINDOW
            drops.append(chat.last.dropped_turns)
            if i == 59:  # warm-up: two drops and re-prefills of the kept history have happened
                assert sum(map(bool, drops)) >= 2
                warm = rss_bytes()
    assert engine.free_kv_tokens() == pages
    for i in range(50):
        with engine.chat() as session:
            list(session.send(f"Hello {i}", None, config))
            assert engine.free_kv_tokens() < pages
        assert engine.free_kv_tokens() == pages
    end = rss_bytes()
    print(
        f"\nVmRSS after warm-up {warm / 2**20:.1f} MiB, after 200 turns + 50 sessions {end / 2**20:.1f} MiB "
        f"({100 * (end - warm) / warm:+.2f}%); drops at turns {[i for i, d in enumerate(drops) if d]}; free KV tokens {pages}"
    )
    assert end < 1.05 * warm
    assert sum(map(bool, drops)) >= 8  # the window was reached all along, not once


def test_context_window_drops_oldest_turns_and_matches_reference(small_window, workspace):
    """At the window the oldest turn goes; the kept history (an image turn and a text turn, answers
    included) is re-rendered from the system prompt and re-prefilled: its answer is PyTorch's on that
    history. A message too long for the window alone is refused, the session left as it was."""
    engine, config = small_window, GenerationConfig(max_new_tokens=3)
    image = Image.open(DEMO_IMAGE)
    question = "What is in the image?"
    with engine.chat() as chat:
        list(chat.send("Tell me about this: " + "red green blue " * 90, None, config))
        list(chat.send(question, image, config))
        for i in range(4):
            list(chat.send(f"Q{i}?", None, config))
            if chat.last.dropped_turns:
                break
        turn = chat.last
        assert turn.dropped_turns == 1 and chat.turns[0].image is not None and len(chat.turns) >= 3
        first = tokenize_with_images(
            engine.tokenizer, Conversation().user_turn(question, with_image=True), add_bos=True
        )
        assert turn.prompt_token_ids[: len(first)] == first  # the image turn now opens the conversation
        assert turn.prompt_token_ids.count(IMAGE_TOKEN_ID) == 1
        assert "red green blue" not in engine.tokenizer.decode(
            [t for t in turn.prompt_token_ids if t != IMAGE_TOKEN_ID]
        )
        assert chat.length == len(turn.prompt_token_ids) - 1 + 144 + len(turn.output_token_ids) - 1

        reference = reference_for(workspace, "ldpnet")
        ref_embeds = reference.image_embeds(reference.pixels(image))
        ref_tokens, ref_logits = reference.greedy(reference.input_embeds(turn.prompt_token_ids, ref_embeds), 3)
        assert turn.output_token_ids == ref_tokens
        assert rel_err(turn.first_logits, ref_logits) < REL_TOL

        state = (chat.seq_id, chat.length, len(chat.turns), engine.free_kv_tokens())
        with pytest.raises(
            MobileVLMError,
            match=rf"prompt of \d+ tokens \(with image tokens\) does not fit the context window of {WINDOW} tokens",
        ):
            list(chat.send("word " * 600, None, config))
        assert (chat.seq_id, chat.length, len(chat.turns), engine.free_kv_tokens()) == state
        list(chat.send("Q?", None, config))
        assert chat.last.dropped_turns == 0 and chat.last.prompt_token_ids[:2] == [turn.output_token_ids[-1], 2]


def test_context_window_override_is_bounded(ldpnet_built):
    with pytest.raises(MobileVLMError, match=r"context_window_size is 4096, expected 1..2048 \(the library's\)"):
        Engine(ldpnet_built.dist, ldpnet_built.lib, context_window_size=4096)


# ---- several sequences in one KV cache ------------------------------------------------------------


def test_generate_batch_equals_each_prompt_alone(ldpnet_engine):
    engine, config = ldpnet_engine, GenerationConfig(max_new_tokens=6)
    prompts = ["Tell me a story.", "What is in the image?", "Name three colours."]
    images = [None, DEMO_IMAGE, None]
    pages = engine.free_kv_tokens()
    batch = engine.generate_batch(prompts, images, config)
    assert engine.free_kv_tokens() == pages
    for result, prompt, image in zip(batch, prompts, images):
        with engine.chat() as alone:
            list(alone.send(prompt, image, config))
        assert result.output_token_ids == alone.last.output_token_ids and len(result.output_token_ids) == 6
        assert result.prompt_token_ids == alone.last.prompt_token_ids
        assert np.array_equal(result.first_logits, alone.last.first_logits)
    assert len({tuple(r.output_token_ids) for r in batch}) == 3
    with pytest.raises(MobileVLMError, match="generate_batch got 3 prompts but 1 images"):
        engine.generate_batch(prompts, [None], config)


# ---- reproducible builds and the manifest ----------------------------------------------------------


def _bytes_but_shape_functions(path: Path) -> bytes:
    """The library's loaded bytes (code, read-only data with the VM bytecode, data) with the code of
    TVM's `shape_func*_compute_` functions zeroed up to the next symbol, the GNU build id zeroed, and
    without what records those functions' sizes (unwind tables, debug info, the symbol table)."""
    data = bytearray(path.read_bytes())
    sections = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout
    kept, text = [], None
    for line in sections.splitlines():
        if "]" not in line or line.split("]", 1)[1].split()[:1] in ([], ["NULL"], ["Name"]):
            continue
        fields = line.split("]", 1)[1].split()
        name, address, offset, size = fields[0], *(int(v, 16) for v in fields[2:5])
        if name == ".note.gnu.build-id":
            data[offset : offset + size] = bytes(size)
        if name == ".text":
            text = (address, offset, size)
        if fields[1] != "NOBITS" and not name.startswith((".debug", ".eh_frame", ".symtab", ".strtab")):
            kept.append((offset, size))
    symbols = subprocess.run(["nm", "-n", "-S", str(path)], capture_output=True, text=True, check=True).stdout
    starts = sorted({int(f[0], 16) for f in (line.split() for line in symbols.splitlines()) if len(f) >= 3})
    for line in symbols.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3].startswith("shape_func") and fields[3].endswith("_compute_"):
            begin = int(fields[0], 16)
            stop = next((a for a in starts if a > begin), text[0] + text[2])
            data[begin - text[0] + text[1] : stop - text[0] + text[1]] = bytes(stop - begin)
    return b"".join(bytes(data[o : o + n]) for o, n in kept)


def test_convert_and_compile_are_reproducible(ldpnet_built, tmp_path, monkeypatch):
    """The same checkpoint, quantization and target, built again under a hostile folder name (the
    linker gets it literally): byte-identical dist files, the same functions, `_metadata` and library
    bytes, a library that runs with the first dist, and its record in the manifest."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / HOSTILE
    dist = convert(ldpnet_built.checkpoint, folder / "dist", "q0f32", progress=False)
    first = sorted(p.name for p in ldpnet_built.dist.iterdir())
    assert sorted(p.name for p in dist.iterdir()) == first and MANIFEST in first
    for name in first:
        if name != MANIFEST:
            assert (dist / name).read_bytes() == (ldpnet_built.dist / name).read_bytes(), name
    md5s = [[s["dataPath"], s["md5sum"]] for s in json.loads((dist / "tensor-cache.json").read_text())["records"]]
    assert md5s == [
        [s["dataPath"], s["md5sum"]]
        for s in json.loads((ldpnet_built.dist / "tensor-cache.json").read_text())["records"]
    ]
    ours, theirs = (json.loads((d / MANIFEST).read_text()) for d in (dist, ldpnet_built.dist))
    assert ours["libraries"] == {} and {**theirs, "libraries": {}} == ours
    assert set(ours["checkpoint"]["files"]) == {
        "config.json",
        "pytorch_model.bin",
        "clip-vision-tower/config.json",
        "clip-vision-tower/preprocessor_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert ours["checkpoint"]["files"]["pytorch_model.bin"] == sha256_file(
        ldpnet_built.checkpoint / "pytorch_model.bin"
    )

    lib = folder / f"{HOSTILE}.so"
    report = compile_model(dist, "cpu", lib)
    again, before = inspect_library(lib), inspect_library(ldpnet_built.lib)
    assert again.metadata == before.metadata and again.metadata["dist"]["quantization"] == "q0f32"

    def exported(path: Path) -> list[str]:
        lines = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
        return sorted(line.split()[-1] for line in lines.stdout.splitlines())

    def shape_functions(symbols: list[str]) -> list[str]:
        return [name for name in symbols if name.startswith("__tvm_ffi_shape_func")]

    ours, theirs = exported(lib), exported(ldpnet_built.lib)
    assert sorted(set(ours) - set(shape_functions(ours))) == sorted(set(theirs) - set(shape_functions(theirs)))
    assert {"decode", "prefill", "image_embed", "embed", "create_tir_paged_kv_cache"} <= set(report["functions"])
    record = json.loads((dist / MANIFEST).read_text())["libraries"][lib.name]
    assert (
        record["sha256"] == sha256_file(lib) and record["target"] == "cpu" and '"kind":"llvm"' in record["tvm_target"]
    )
    assert record["build"] == before.metadata["build"]
    # on this machine even the bytes agree, except TVM's generated shape functions (`shape_func*`, which
    # compute the image's padded side and the resampler's taps): TVM's VMShapeLower emits their statements
    # in another order from build to build, and sometimes one shape function more (the same computation
    # twice), which moves all code after it. With the same shape functions, the rest is byte-identical.
    if shape_functions(ours) == shape_functions(theirs):
        assert _bytes_but_shape_functions(lib) == _bytes_but_shape_functions(ldpnet_built.lib)
    Engine(ldpnet_built.dist, lib)  # same checkpoint, quantization and config: interchangeable
    assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*"))


def test_library_from_another_dist_is_refused(ldpnet_built, tmp_path):
    other = convert(ldpnet_built.checkpoint, tmp_path / "window1024", "q0f32", context_window_size=1024, progress=False)
    message = f"{ldpnet_built.lib}: built from a different dist than {other / MANIFEST} (model_config: library "
    with pytest.raises(
        MobileVLMError,
        match=re.escape(message) + r"[0-9a-f]{12}…, dist [0-9a-f]{12}…\); compile the library from this dist",
    ):
        Engine(other, ldpnet_built.lib)

    (other / MANIFEST).unlink()
    with pytest.raises(MobileVLMError, match=re.escape(f"{other / MANIFEST}: not found")):
        Engine(other, ldpnet_built.lib)
    with pytest.raises(MobileVLMError, match=re.escape(f"{other / MANIFEST}: not found")):
        compile_model(other, "cpu", tmp_path / "x.so")
    assert not (tmp_path / "x.so").exists()
    with pytest.raises(MobileVLMError, match="records no dist identity"):
        check_library(load_dist(ldpnet_built.dist), ldpnet_built.lib, {"model_type": "mobilevlm"})


# ---- paths: never a shell, never a write outside the output folder ----------------------------------


def test_no_shell_anywhere():
    """No subprocess call with shell=True, no os.system / os.popen / subprocess.getoutput in the code:
    every tool (ar, nm, nvcc, git, the linkers through TVM) gets an argument list."""
    found = []
    for path in [
        *ROOT.glob("mobilevlm_mlc/*.py"),
        *ROOT.glob("targets/*.py"),
        *ROOT.glob("model_defs/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            shell = any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            )
            if shell or name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found


def test_package_passes_hostile_paths_literally(android_models, tmp_path, monkeypatch):
    """A config, libraries and an output folder whose names a shell would act on (`;`, `$(...)`,
    backquotes, quotes, spaces, a leading '-'): `ar` and `nm` get them as plain arguments."""
    folder = tmp_path / HOSTILE
    folder.mkdir()
    copies = {}
    for name, (dist, lib, model_lib) in android_models.items():
        copies[name] = (dist, shutil.copy(lib, folder / f"{HOSTILE} {lib.name}"), model_lib)
    config = write_config(folder, copies)
    monkeypatch.chdir(tmp_path)
    out = package(config, Path(f"-{HOSTILE}"))
    assert out == tmp_path / f"-{HOSTILE}"
    symbols = subprocess.run(
        ["nm", "--defined-only", str(out / "lib" / "libmodel_android.a")], capture_output=True, text=True, check=True
    ).stdout
    for _, _, model_lib in android_models.values():
        assert f" {model_lib}___tvm_ffi__library_bin" in symbols
    assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*"))


@pytest.mark.parametrize("model_lib", ["../../../escape", "a/b", "/tmp/x", "x;touch pwned", "-rf"])
def test_package_model_lib_cannot_name_a_path(android_models, tmp_path, model_lib):
    """`model_lib` names symbols and (before this check) a scratch file: a path in it is refused."""
    config_path = write_config(tmp_path, android_models)
    config = json.loads(config_path.read_text())
    real = config["model_list"][0]["model_lib"]
    config["model_list"][0]["model_lib"] = model_lib
    config["model_lib_path_for_prepare_libs"][model_lib] = config["model_lib_path_for_prepare_libs"].pop(real)
    config_path.write_text(json.dumps(config))
    with pytest.raises(MobileVLMError, match=re.escape(f"model_lib '{model_lib}' must be a C identifier")):
        package(config_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlc-package-config.json"]


@pytest.mark.parametrize("shard", ["../outside.bin", "/etc/hostname"])
def test_weight_index_cannot_point_outside_the_checkpoint(tmp_path, shard):
    from mobilevlm_mlc.convert.checkpoint import CheckpointTensors

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(
        MobileVLMError, match=re.escape(f"shard '{shard}' listed for lm_head.weight is outside the checkpoint folder")
    ):
        CheckpointTensors(folder)


@pytest.mark.parametrize("data_path", ["../params_shard_0.bin", "/etc/hostname"])
def test_tensor_cache_cannot_point_outside_the_dist(ldpnet_built, tmp_path, data_path):
    import tvm

    from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache

    cache = json.loads((ldpnet_built.dist / "tensor-cache.json").read_text())
    cache["records"][0]["dataPath"] = data_path
    (tmp_path / "tensor-cache.json").write_text(json.dumps(cache))
    with pytest.raises(MobileVLMError, match=re.escape(f"shard path '{data_path}' leaves the dist folder")):
        load_tensor_cache(tmp_path, tvm.cpu())
