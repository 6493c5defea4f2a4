"""Reading an official MobileVLM checkpoint folder (HF layout): its config and its tensors.

Tensors are read lazily, one at a time, from `model.safetensors` or `pytorch_model.bin` (sharded or not,
`*.index.json`). Pickles are opened with `weights_only=True`, so no pickled code ever runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.fileio import read_json
from mobilevlm_mlc.formats.dist import config_error
from mobilevlm_mlc.model_defs.config import (
    PROJECTOR_TYPES,
    ConfigError,
    ImageProcessorConfig,
    MobileVLMConfig,
    TextConfig,
    VisionConfig,
)

STANDARD_VISION_TOWER = "openai/clip-vit-large-patch14-336"
STANDARD_VISION_CONFIG = VisionConfig()  # ViT-L/14 at 336 px: the dataclass defaults
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a checkpoint's tensors may be stored as
# safetensors' dtype names -> torch's
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, default: Any = ...) -> Any:
    if key not in data or data[key] is None:
        if default is ...:
            raise MobileVLMError(f"{path}: missing field '{key}'")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        names = " or ".join(k.__name__ for k in kinds)
        raise MobileVLMError(f"{path}: field '{key}' is {value!r}, expected {names}")
    if isinstance(value, int) and value <= 0 and key not in ("mm_vision_select_layer",):
        raise MobileVLMError(f"{path}: field '{key}' is {value}, expected a positive number")
    return value


def load_config(model_dir: Path) -> MobileVLMConfig:
    """Build the architecture from `config.json` (and the vision tower's own config when it is a folder)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MobileVLMError(f"{model_dir}: model folder not found")
    path = model_dir / "config.json"
    cfg = read_json(path, "config.json")
    projector = _field(cfg, "mm_projector_type", str, path)
    if projector not in PROJECTOR_TYPES:
        raise MobileVLMError(
            f"{path}: unknown mm_projector_type '{projector}' (expected one of {', '.join(PROJECTOR_TYPES)})"
        )
    if cfg.get("rope_scaling"):
        raise MobileVLMError(f"{path}: rope_scaling {cfg['rope_scaling']!r} is not supported (expected null)")
    if cfg.get("tie_word_embeddings"):
        raise MobileVLMError(f"{path}: tie_word_embeddings=true is not supported (MobileVLM has an untied lm_head)")
    heads = _field(cfg, "num_attention_heads", int, path)
    text = TextConfig(
        hidden_size=_field(cfg, "hidden_size", int, path),
        intermediate_size=_field(cfg, "intermediate_size", int, path),
        num_hidden_layers=_field(cfg, "num_hidden_layers", int, path),
        num_attention_heads=heads,
        num_key_value_heads=_field(cfg, "num_key_value_heads", int, path, heads),
        vocab_size=_field(cfg, "vocab_size", int, path),
        rms_norm_eps=_field(cfg, "rms_norm_eps", float, path, 1e-6),
        rope_theta=_field(cfg, "rope_theta", float, path, 10000.0),
        max_position_embeddings=_field(cfg, "max_position_embeddings", int, path, 2048),
    )
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise MobileVLMError(f"{path}: mm_vision_select_feature {feature!r} is not supported (expected 'patch')")
    aspect = cfg.get("image_aspect_ratio", "pad")
    if aspect != "pad":
        raise MobileVLMError(f"{path}: image_aspect_ratio {aspect!r} is not supported (expected 'pad')")
    tower = _field(cfg, "mm_vision_tower", str, path)
    vision, processor = _vision_config(model_dir, tower, path)
    vision.select_layer = _field(cfg, "mm_vision_select_layer", int, path, -2)
    mm_hidden = _field(cfg, "mm_hidden_size", int, path, vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise MobileVLMError(
            f"{path}: mm_hidden_size {mm_hidden} differs from the vision tower's hidden_size {vision.hidden_size}"
        )
    context = text.max_position_embeddings
    config = MobileVLMConfig(
        text=text,
        vision=vision,
        projector_type=projector,
        image_processor=processor,
        context_window_size=context,
        prefill_chunk_size=min(context, 2048),
    )
    validate_config(config, path, hf_names=True)
    return config


def validate_config(config: MobileVLMConfig, where: Path | str, hf_names: bool = False) -> None:
    """`config.validate()`, its ConfigError reported against the file it came from. `hf_names`: name
    the decoder's fields as config.json does (`rope_theta`, not `text.rope_theta`)."""
    try:
        config.validate()
    except ConfigError as err:
        field = err.field.removeprefix("text.") if hf_names else err.field
        raise config_error(ConfigError(field, err.problem), where) from None


def _vision_folder(model_dir: Path, tower: str) -> Path | None:
    """The folder of a non-standard vision tower's CLIP config (absolute, or relative to the checkpoint)."""
    if tower == STANDARD_VISION_TOWER:
        return None
    return Path(tower) if Path(tower).is_absolute() else model_dir / tower


def _vision_config(model_dir: Path, tower: str, config_path: Path) -> tuple[VisionConfig, ImageProcessorConfig]:
    folder = _vision_folder(model_dir, tower)
    if folder is None:
        return VisionConfig(), ImageProcessorConfig()
    if not (folder / "config.json").is_file():
        raise MobileVLMError(
            f"{config_path}: mm_vision_tower '{tower}' is neither '{STANDARD_VISION_TOWER}' "
            f"nor a folder holding a CLIP config.json (looked in {folder})"
        )
    vpath = folder / "config.json"
    data = read_json(vpath, "vision tower config.json")
    data = data.get("vision_config", data)  # a full CLIPConfig nests the vision part
    vision = VisionConfig(
        hidden_size=_field(data, "hidden_size", int, vpath),
        intermediate_size=_field(data, "intermediate_size", int, vpath),
        num_hidden_layers=_field(data, "num_hidden_layers", int, vpath),
        num_attention_heads=_field(data, "num_attention_heads", int, vpath),
        image_size=_field(data, "image_size", int, vpath),
        patch_size=_field(data, "patch_size", int, vpath),
        num_channels=_field(data, "num_channels", int, vpath, 3),
        layer_norm_eps=_field(data, "layer_norm_eps", float, vpath, 1e-5),
        hidden_act=_field(data, "hidden_act", str, vpath, "quick_gelu"),
    )
    if vision.hidden_act != "quick_gelu":
        raise MobileVLMError(f"{vpath}: hidden_act '{vision.hidden_act}' is not supported (expected 'quick_gelu')")
    if vision.num_channels != 3 or vision.image_size % vision.patch_size:
        raise MobileVLMError(f"{vpath}: expected 3 channels and image_size divisible by patch_size")
    ppath = folder / "preprocessor_config.json"
    processor = ImageProcessorConfig(resize_shortest_edge=vision.image_size, crop_size=vision.image_size)
    if ppath.is_file():
        pre = read_json(ppath, "preprocessor_config.json")
        size = pre.get("size", vision.image_size)
        crop = pre.get("crop_size", vision.image_size)
        processor = ImageProcessorConfig(
            resize_shortest_edge=int(size["shortest_edge"] if isinstance(size, dict) else size),
            crop_size=int(crop["height"] if isinstance(crop, dict) else crop),
            image_mean=tuple(float(x) for x in pre.get("image_mean", processor.image_mean)),
            image_std=tuple(float(x) for x in pre.get("image_std", processor.image_std)),
        )
        if processor.crop_size != vision.image_size:
            raise MobileVLMError(
                f"{ppath}: crop_size {processor.crop_size} differs from the tower's image_size {vision.image_size}"
            )
    return vision, processor


def vision_tower_folders(model_dir: Path) -> list[Path]:
    """The vision tower's config folder when config.json names one (an input `convert` reads)."""
    try:
        tower = read_json(Path(model_dir) / "config.json", "config.json").get("mm_vision_tower")
    except MobileVLMError:
        return []
    folder = _vision_folder(Path(model_dir), tower) if isinstance(tower, str) and "\x00" not in tower else None
    return [folder] if folder is not None else []


def input_files(model_dir: Path, tensors: CheckpointTensors) -> list[Path]:
    """Every checkpoint file `convert` reads except the tokenizer's: config.json, the vision tower's
    config folder (when it is one) and the weights."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"]
    folder = _vision_folder(model_dir, str(read_json(model_dir / "config.json", "config.json").get("mm_vision_tower")))
    if folder is not None:
        files += [f for f in (folder / "config.json", folder / "preprocessor_config.json") if f.is_file()]
    return files + tensors.files()


class CheckpointTensors:
    """Lazy, read-only access to a checkpoint's tensors by their official names."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._index: Path | None = None
        for base in WEIGHT_FILES:
            index = self.model_dir / f"{base}.index.json"
            single = self.model_dir / base
            if index.is_file():
                weight_map = read_json(index, "weight index").get("weight_map")
                if not isinstance(weight_map, dict):
                    raise MobileVLMError(f"{index}: missing field 'weight_map'")
                self._index = index
                for name, file in weight_map.items():
                    shard = self.model_dir / str(file)
                    if Path(str(file)).is_absolute() or ".." in Path(str(file)).parts:
                        raise MobileVLMError(
                            f"{index}: shard '{file}' listed for {name} is outside the checkpoint folder"
                        )
                    if not shard.is_file():
                        raise MobileVLMError(f"{index}: shard '{file}' listed for {name} not found")
                    self._file_of[name] = shard
                break
            if single.is_file():
                for name in self._handle(single).keys():
                    self._file_of[name] = single
                break
        else:
            raise MobileVLMError(
                f"{self.model_dir}: no weights found (expected one of {', '.join(WEIGHT_FILES)}, or its .index.json)"
            )

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[path] = safe_open(str(path), framework="pt")
                else:
                    import torch

                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - any reader failure is a bad file for the user
                raise MobileVLMError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
        return self._open[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def files(self) -> list[Path]:
        """The weight files this checkpoint reads (shards and their index), for the dist's manifest."""
        return sorted({*self._file_of.values(), *([self._index] if self._index else [])})

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._file_of[name])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype's name as torch spells it ('bfloat16', 'int64', ...)."""
        handle = self._handle(self._file_of[name])
        if hasattr(handle, "get_slice"):
            stored = handle.get_slice(name).get_dtype()
            return _SAFETENSORS_DTYPES.get(stored, stored.lower())
        return str(handle[name].dtype).removeprefix("torch.")

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 numpy (bf16 / fp16 checkpoints are upcast exactly)."""
        path = self._file_of[name]
        handle = self._handle(path)
        try:
            tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
            return tensor.float().numpy()
        except Exception as err:  # noqa: BLE001
            raise MobileVLMError(f"{path}: cannot read tensor {name} ({type(err).__name__}: {err})") from None
