"""The converted-model folder (MLC layout): `mlc-chat-config.json` (with MobileVLM's `v1` conversation
template in MLC's schema), tensor cache, tokenizer files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.fileio import read_json
from mobilevlm_mlc.model_defs.config import ConfigError, MobileVLMConfig
from mobilevlm_mlc.model_defs.quantization import Quantization, get_quantization

CHAT_CONFIG = "mlc-chat-config.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
)

SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# MLC's `Conversation` schema, as stored in mlc-chat-config.json's `conv_template`.
V1_TEMPLATE: dict = {
    "name": "mobilevlm_v1",
    "system_template": "{system_message}",
    "system_message": SYSTEM_MESSAGE,
    "system_prefix_token_ids": [1],
    "add_role_after_system_message": True,
    "roles": {"user": "USER", "assistant": "ASSISTANT"},
    "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}"},
    "messages": [],
    "seps": [" ", "</s>"],
    "role_content_sep": ": ",
    "role_empty_sep": ":",
    "stop_str": ["</s>"],
    "stop_token_ids": [2],
    "function_string": "",
    "use_function_calling": False,
}


def check_conv_template(template: object, where: object) -> None:
    """Refuse a `conv_template` (from mlc-chat-config.json) that the prompt renderer cannot use."""

    def bad(field: str, found: object, expected: str) -> MobileVLMError:
        return MobileVLMError(f"{where}: field 'conv_template.{field}' is {found!r}, expected {expected}")

    if not isinstance(template, dict):
        raise MobileVLMError(f"{where}: field 'conv_template' is {template!r}, expected an object (MLC's Conversation)")
    for key in ("system_message", "role_content_sep", "role_empty_sep"):
        if not isinstance(template.get(key), str):
            raise bad(key, template.get(key), "a string")
    roles = template.get("roles")
    if not isinstance(roles, dict) or not all(isinstance(roles.get(r), str) for r in ("user", "assistant")):
        raise bad("roles", roles, "an object with string 'user' and 'assistant'")
    seps = template.get("seps")
    if not isinstance(seps, list) or len(seps) not in (1, 2) or not all(isinstance(x, str) for x in seps):
        raise bad("seps", seps, "a list of one or two strings")
    stops = template.get("stop_token_ids")
    if not isinstance(stops, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stops):
        raise bad("stop_token_ids", stops, "a list of token ids")


def config_error(err: ConfigError, where: Path | str, prefix: str = "") -> MobileVLMError:
    """A ConfigError as one line against its file; `prefix` is where the config sits in that file."""
    return MobileVLMError(f"{where}: field '{prefix}{err.field}' {err.problem}")


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
        raise MobileVLMError(
            f"{cfg_path}: model_config.dtype is {config.dtype!r}, but {quantization.name} computes in {quantization.model_dtype}"
        )
    check_conv_template(chat.get("conv_template"), cfg_path)
    return Dist(path, chat, config, quantization)
