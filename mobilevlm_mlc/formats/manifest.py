"""`mobilevlm-manifest.json`: what a dist folder was made from, and which libraries were built from it.

`convert` writes it: the sha256 of every checkpoint file it read, the quantization, the model config's
hash, the tool and TVM versions (no paths or times, so converting twice gives the same bytes).
`compile` embeds the dist's identity (checkpoint, quantization, model config) in the library's
`_metadata` and records the library here (target, TVM target string with its flags, sha256).
`Engine` refuses a library whose identity differs from its dist's, naming both files: weights of the
same shapes from another checkpoint would otherwise load and answer garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mobilevlm_mlc import __version__
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.fileio import atomic_file, read_json

from .dist import CHAT_CONFIG, Dist
from .tensor_cache import TENSOR_CACHE

MANIFEST = "mobilevlm-manifest.json"
FORMAT = 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of canonical JSON (sorted keys, no spaces): equal values hash equal."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def convert_manifest(files: dict[str, Path], quantization: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """The manifest `convert` writes; `files` maps each checkpoint file's name (as recorded) to its path."""
    import tvm

    hashes = {name: sha256_file(path) for name, path in sorted(files.items())}
    return {
        "format": FORMAT,
        "tool": {"name": "mobilevlm-mlc", "version": __version__},
        "tvm_version": tvm.__version__,
        "checkpoint": {"files": hashes, "sha256": sha256_json(hashes)},
        "quantization": quantization,
        "model_config_sha256": sha256_json(model_config),
        "libraries": {},
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(Path(folder) / MANIFEST, "json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def dist_files(folder: Path) -> set[str] | None:
    """What `convert` (and `compile`, for libraries it recorded) wrote in a dist folder, or None when
    the folder is not a dist of ours: the manifest, the chat config and its tokenizer files, the
    tensor cache and its shards."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        chat = json.loads((folder / CHAT_CONFIG).read_text())
        cache = json.loads((folder / TENSOR_CACHE).read_text())
        owned = {MANIFEST, CHAT_CONFIG, TENSOR_CACHE}
        owned |= {str(shard["dataPath"]) for shard in cache["records"]}
        owned |= {str(name) for name in chat.get("tokenizer_files", [])}
        owned |= {str(name) for name in manifest.get("libraries", {})}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if manifest.get("tool", {}).get("name") != "mobilevlm-mlc":
        return None
    return owned


def read_manifest(dist_dir: Path) -> dict[str, Any]:
    path = Path(dist_dir) / MANIFEST
    if not path.is_file():
        raise MobileVLMError(
            f"{path}: not found (the dist was converted by an older mobilevlm-mlc or copied without it); "
            "convert the checkpoint again"
        )
    manifest = read_json(path, MANIFEST)
    checkpoint = manifest.get("checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("sha256"), str):
        raise MobileVLMError(f"{path}: field 'checkpoint.sha256' is missing or not a string")
    if not isinstance(manifest.get("libraries", {}), dict):
        raise MobileVLMError(f"{path}: field 'libraries' is {manifest['libraries']!r}, expected an object")
    return manifest


def dist_identity(dist: Dist) -> dict[str, str]:
    """What a library built from `dist` carries and must match at load: checkpoint, quantization, model config."""
    return {
        "checkpoint_sha256": read_manifest(dist.path)["checkpoint"]["sha256"],
        "quantization": dist.quantization.name,
        "model_config_sha256": sha256_json(dist.config.to_dict()),
    }


def record_library(dist: Dist, library: Path, record: dict[str, Any]) -> None:
    """Add `library` (how it was built, and its sha256) to the dist's manifest, replacing the file atomically."""
    manifest = read_manifest(dist.path)
    manifest.setdefault("libraries", {})[Path(library).name] = {**record, "sha256": sha256_file(library)}
    try:
        write_manifest(dist.path, manifest)
    except OSError as err:
        raise MobileVLMError(f"{dist.path / MANIFEST}: cannot record the library {library} ({err})") from None


def library_is_recorded(dist_dir: Path, library: Path) -> bool:
    """Whether `library` exists and is, byte for byte, one that `compile` recorded in this dist's manifest."""
    path = Path(dist_dir) / MANIFEST
    if not Path(library).is_file() or not path.is_file():
        return False
    libraries = read_json(path, MANIFEST).get("libraries")
    entry = libraries.get(Path(library).name) if isinstance(libraries, dict) else None
    return isinstance(entry, dict) and entry.get("sha256") == sha256_file(library)


def check_library(dist: Dist, library: Path, metadata: dict[str, Any]) -> None:
    """Refuse a library built from another dist (another checkpoint, quantization or model config)."""
    ours, theirs = dist_identity(dist), metadata.get("dist")
    if not isinstance(theirs, dict):
        raise MobileVLMError(
            f"{library}: records no dist identity (compiled by an older mobilevlm-mlc); "
            f"compile it again from {dist.path}"
        )
    short = lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else repr(v)  # noqa: E731
    differ = [
        f"{key.removesuffix('_sha256')}: library {short(theirs.get(key))}, dist {short(value)}"
        for key, value in ours.items()
        if theirs.get(key) != value
    ]
    if differ:
        raise MobileVLMError(
            f"{library}: built from a different dist than {dist.path / MANIFEST} ({'; '.join(differ)}); "
            "compile the library from this dist"
        )
