"""`package`: MLC's `mlc-package-config.json` -> what an MLC Android app bundles and links.

Writes `OUT/bundle/mlc-app-config.json`, the weights of models with `bundle_weight: true` under
`OUT/bundle/<model_id>/`, and `OUT/lib/libmodel_android.a`: every model library's objects merged with
`ar`, checked (as MLC does) to define each model's `<model_lib>___tvm_ffi__library_bin` symbol.
Relative paths are read from the config file's folder. Nothing in `OUT` changes unless all succeeds.

Checked against what MLC's app does with them (mlc-llm 79d603f): each library must hold OpenCL code
(the app's engine runs on `Device.opencl()`); `overrides` may lower `context_window_size` and
`prefill_chunk_size` within what the library was compiled for, and are written into the bundled
copy's `mlc-chat-config.json`; a prefill chunk must hold one image turn (MLC never splits an image).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilevlm_mlc.fileio import read_json
from mobilevlm_mlc.formats.dist import CHAT_CONFIG, Dist, load_dist
from mobilevlm_mlc.formats.library import inspect_library

from .errors import MobileVLMError
from .fileio import TEMP_PREFIX, atomic_dir

LIBRARY = "libmodel_android.a"
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SYMBOL_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a model_lib names C symbols, never a path


OVERRIDES = ("context_window_size", "prefill_chunk_size")  # the `overrides` a prebuilt library can honour


@dataclass
class PackagedModel:
    model_id: str
    model_lib: str
    dist: Path
    library: Path
    bundle_weight: bool
    estimated_vram_bytes: int
    overrides: dict[str, int]


def min_prefill_chunk(info: Dist) -> int:
    """The smallest prefill chunk MLC's engine can run an image turn in: it never splits an image's
    embeddings across chunks, so one chunk must hold the image's tokens and the first turn around it
    (BOS, system prompt, roles)."""
    from mobilevlm_mlc.formats.dist import TOKENIZER_MODEL
    from mobilevlm_mlc.runtime.conversation import Conversation, tokenize_with_images
    from mobilevlm_mlc.runtime.tokenizer import Tokenizer

    turn = Conversation(template=dict(info.chat_config["conv_template"])).user_turn("", with_image=True)
    ids = tokenize_with_images(Tokenizer(info.path / TOKENIZER_MODEL), turn, add_bos=True)
    return len(ids) - 1 + info.config.num_image_tokens


def _check_library(where: str, library: Path) -> dict:
    """The library's `_metadata`, once it is known to hold OpenCL code, the only kind MLC's Android app runs."""
    report = inspect_library(library)
    kinds = sorted({module.kind for module in report.device_modules})
    if "opencl" not in kinds:
        holds = f"{', '.join(kinds)} device code" if kinds else "CPU code only"
        raise MobileVLMError(
            f"{where}: library {library.name} holds {holds}; MLC's Android app creates its engine on "
            "Device.opencl() (mlc4j's JSONFFIEngine), so it cannot run it: compile with `--target android-adreno`, "
            "or change the app to create its engine on the CPU"
        )
    return report.metadata


def _overrides(where: str, entry: dict, info: Dist, library_meta: dict, bundled: bool) -> dict[str, int]:
    """MLC's per-model `overrides`, checked against what the prebuilt library was compiled for."""
    overrides = entry.get("overrides", {})
    if not isinstance(overrides, dict):
        raise MobileVLMError(f"{where}: field 'overrides' is {overrides!r}, expected an object")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise MobileVLMError(
            f"{where}: overrides.{unknown[0]} cannot change a prebuilt library; expected only {', '.join(OVERRIDES)}"
        )
    chat = info.chat_config
    sizes = {}
    for key in OVERRIDES:
        value = overrides.get(key, chat[key])
        built = int(library_meta[key])
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= built:
            raise MobileVLMError(
                f"{where}: overrides.{key} is {value!r}, expected an integer in [1, {built}] (the library's)"
            )
        sizes[key] = value
    if sizes["prefill_chunk_size"] > sizes["context_window_size"]:
        raise MobileVLMError(
            f"{where}: prefill_chunk_size {sizes['prefill_chunk_size']} exceeds context_window_size {sizes['context_window_size']}"
        )
    needed = min_prefill_chunk(info)
    if sizes["prefill_chunk_size"] < needed:
        raise MobileVLMError(
            f"{where}: prefill_chunk_size is {sizes['prefill_chunk_size']}, expected at least {needed}: MLC's engine "
            "cannot split an image across prefill chunks, and one image turn takes that many tokens"
        )
    changed = {key: v for key, v in sizes.items() if v != chat[key]}
    if changed and not bundled:
        raise MobileVLMError(
            f"{where}: overrides change {', '.join(changed)}, which only a bundled copy can carry "
            "(set bundle_weight: true, or convert the dist with these sizes)"
        )
    return changed


def estimated_vram_bytes(info: Dist, library_meta: dict, context_window_size: int) -> int:
    """Weights, a KV cache of one context window (the app's default), and the largest static workspace
    of the library's functions (`_metadata.memory_usage`, as MLC's engine budgets it)."""
    text, weights = info.config.text, 0
    for shard in read_json(info.path / "tensor-cache.json", "tensor-cache.json").get("records", []):
        weights += int(shard.get("nbytes", 0))
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * context_window_size
    workspace = max(library_meta.get("memory_usage", {}).values(), default=0)
    return weights + kv * np.dtype(info.config.dtype).itemsize + workspace


def _read_config(path: Path) -> list[PackagedModel]:
    config = read_json(path, "package config")
    base = path.parent
    if config.get("device") != "android":
        raise MobileVLMError(
            f"{path}: field 'device' is {config.get('device')!r}, expected 'android' (iphone packaging is not supported)"
        )
    models, libs = config.get("model_list"), config.get("model_lib_path_for_prepare_libs", {})
    if not isinstance(models, list) or not models:
        raise MobileVLMError(f"{path}: field 'model_list' must be a non-empty list")
    if not isinstance(libs, dict):
        raise MobileVLMError(f"{path}: field 'model_lib_path_for_prepare_libs' must be an object")
    seen: set[str] = set()
    result = []
    for i, entry in enumerate(models):
        where = f"{path}: model_list[{i}]"
        if not isinstance(entry, dict):
            raise MobileVLMError(f"{where} must be an object")
        model_id, model_lib, model = entry.get("model_id"), entry.get("model_lib"), entry.get("model")
        for key, value in (("model_id", model_id), ("model_lib", model_lib), ("model", model)):
            if not isinstance(value, str) or not value:
                raise MobileVLMError(f"{where}: field '{key}' is missing or not a string")
        if not SAFE_ID.fullmatch(model_id) or model_id in seen:
            raise MobileVLMError(
                f"{where}: model_id '{model_id}' must be a unique plain name (it becomes a folder under bundle/)"
            )
        seen.add(model_id)
        if not SYMBOL_PREFIX.fullmatch(model_lib):
            raise MobileVLMError(
                f"{where}: model_lib '{model_lib}' must be a C identifier (the library's symbol prefix)"
            )
        if model.startswith("HF://"):
            raise MobileVLMError(
                f"{where}: model '{model}' is on a model hub; give the path of a converted dist folder"
            )
        dist = _resolve(base, model, f"{where}: model")
        if not (dist / CHAT_CONFIG).is_file():
            raise MobileVLMError(f"{where}: model '{model}' is not a dist folder ({dist / CHAT_CONFIG} not found)")
        if model_lib not in libs:
            raise MobileVLMError(f"{where}: model_lib '{model_lib}' has no entry in model_lib_path_for_prepare_libs")
        library = _resolve(base, str(libs[model_lib]), f"{path}: model_lib_path_for_prepare_libs['{model_lib}']")
        if not library.is_file() or library.suffix != ".tar" or not tarfile.is_tarfile(library):
            raise MobileVLMError(
                f"{where}: library '{libs[model_lib]}' for '{model_lib}' is not a .tar system library ({library})"
            )
        bundled = bool(entry.get("bundle_weight", False))
        library_meta = _check_library(where, library)
        info = load_dist(dist)  # read once: the overrides, the prefill floor and the VRAM estimate use it
        overrides = _overrides(where, entry, info, library_meta, bundled)
        window = overrides.get("context_window_size", info.config.context_window_size)
        vram = entry.get("estimated_vram_bytes")
        result.append(
            PackagedModel(
                model_id,
                model_lib,
                dist,
                library,
                bundled,
                int(vram) if isinstance(vram, int) and vram > 0 else estimated_vram_bytes(info, library_meta, window),
                overrides,
            )
        )
    return result


def _resolve(base: Path, value: str, what: str) -> Path:
    """A config path made absolute; a NUL byte (which no file name holds) is a clear error, not ValueError."""
    if "\x00" in value:
        raise MobileVLMError(f"{what} {value!r} contains a NUL byte; expected a path")
    return (base / value).resolve()


def _merge_objects(models: list[PackagedModel], lib_dir: Path, scratch: Path) -> Path:
    objects: list[Path] = []
    for model in models:
        try:
            with tarfile.open(model.library) as tar:
                for member in tar.getmembers():
                    if not member.isfile() or not member.name.endswith(".o"):
                        continue
                    target = scratch / f"{len(objects)}_{Path(member.name).name}"  # lib0.o repeats across models
                    target.write_bytes(tar.extractfile(member).read())
                    objects.append(target)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise MobileVLMError(f"{model.library}: not a readable system library ({err})") from None
    archive = lib_dir / LIBRARY
    try:
        subprocess.run(["ar", "rcs", str(archive), *map(str, objects)], check=True, capture_output=True)
        symbols = subprocess.run(
            ["nm", "--defined-only", str(archive)], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as err:
        message = (err.stderr if isinstance(err.stderr, str) else err.stderr.decode(errors="replace")).strip()
        raise MobileVLMError(
            f"`{err.cmd[0]}` failed on the libraries' objects ({message.splitlines()[0] if message else err.returncode})"
        ) from None
    for model in models:
        if f" {model.model_lib}___tvm_ffi__library_bin" not in symbols:
            raise MobileVLMError(
                f"{model.library}: does not define {model.model_lib}___tvm_ffi__library_bin "
                f"(was it compiled from a dist folder named like '{model.model_lib.removeprefix('mobilevlm_')}'?)"
            )
    return archive


def _bundle_files(folder: Path) -> set[str] | None:
    """What `package` wrote in OUT/bundle: the app config and each bundled model's dist, else None."""
    try:
        entries = json.loads((folder / "mlc-app-config.json").read_text())["model_list"]
        bundled = [str(e["model_path"]) for e in entries if "model_path" in e]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    owned = {"mlc-app-config.json"}
    for name in bundled:
        if SAFE_ID.fullmatch(name) and (folder / name).is_dir():
            owned |= {p.relative_to(folder).as_posix() for p in (folder / name).rglob("*") if not p.is_dir()}
    return owned


def _lib_files(folder: Path) -> set[str] | None:
    return {LIBRARY} if (folder / LIBRARY).is_file() else None


def package(config_path: Path, output: Path) -> Path:
    config_path, output = Path(config_path), Path(output).absolute()  # `ar` and `nm` never see a path starting with '-'
    models = _read_config(config_path)
    if shutil.which("ar") is None or shutil.which("nm") is None:
        raise MobileVLMError("packaging needs binutils' `ar` and `nm` on PATH")
    inputs = [config_path, *(m.dist for m in models), *(m.library for m in models)]
    # each part is checked (ours or absent, no overlap with an input) before anything is written, and
    # swapped in whole at the end
    with (
        atomic_dir(output / "bundle", _bundle_files, inputs) as bundle,
        atomic_dir(output / "lib", _lib_files, inputs) as lib,
        tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=output) as objects,
    ):
        _merge_objects(models, lib, Path(objects))
        app_models = []
        for model in models:
            entry = {
                "model_id": model.model_id,
                "model_lib": model.model_lib,
                "estimated_vram_bytes": model.estimated_vram_bytes,
            }
            if model.bundle_weight:
                shutil.copytree(model.dist, bundle / model.model_id)
                entry["model_path"] = model.model_id
                if model.overrides:  # what MLC's engine reads from the bundled model's chat config
                    chat_path = bundle / model.model_id / CHAT_CONFIG
                    chat = json.loads(chat_path.read_text()) | model.overrides
                    chat_path.write_text(json.dumps(chat, indent=2) + "\n")
            else:
                entry["model_url"] = str(model.dist)
            app_models.append(entry)
        (bundle / "mlc-app-config.json").write_text(json.dumps({"model_list": app_models}, indent=2) + "\n")
    return output
