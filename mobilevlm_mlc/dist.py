"""The converted-model folder (MLC layout): `mlc-chat-config.json`, tensor cache, tokenizer files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_defs.config import ConfigError, MobileVLMConfig

from .checkpoint import config_error, read_json
from .conversation import check_conv_template
from .errors import MobileVLMError
from .quantization import Quantization, get_quantization

CHAT_CONFIG = "mlc-chat-config.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


@dataclass
class Dist:
    path: Path
    chat_config: dict[str, Any]
    config: MobileVLMConfig
    quantization: Quantization


def load_dist(path: Path) -> Dist:
    path = Path(path)
    if not path.is_dir():
        raise MobileVLMError(f"{path}: dist folder not found (create it with `mobilevlm-mlc convert`)")
    cfg_path = path / CHAT_CONFIG
    chat = read_json(cfg_path, CHAT_CONFIG)
    if chat.get("model_type") != "mobilevlm":
        raise MobileVLMError(f"{cfg_path}: model_type is {chat.get('model_type')!r}, expected 'mobilevlm'")
    model_config = chat.get("model_config")
    if not isinstance(model_config, dict):
        raise MobileVLMError(f"{cfg_path}: field 'model_config' is {model_config!r}, expected an object")
    try:
        config = MobileVLMConfig.from_dict(model_config)
    except ConfigError as err:
        raise config_error(err, cfg_path, "model_config.") from None
    quantization = get_quantization(str(chat.get("quantization")))
    if config.dtype != quantization.model_dtype:
        raise MobileVLMError(f"{cfg_path}: model_config.dtype is {config.dtype!r}, but {quantization.name} computes in {quantization.model_dtype}")
    check_conv_template(chat.get("conv_template"), cfg_path)
    return Dist(path, chat, config, quantization)
