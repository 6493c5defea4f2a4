"""The converted-model folder (MLC layout): `mlc-chat-config.json`, tensor cache, tokenizer files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_defs.config import MobileVLMConfig

from .checkpoint import read_json
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
    try:
        config = MobileVLMConfig.from_dict(chat["model_config"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise MobileVLMError(f"{cfg_path}: field 'model_config' is malformed ({type(err).__name__}: {err})") from None
    return Dist(path, chat, config, get_quantization(str(chat.get("quantization"))))
