"""MobileVLM's `v1` conversation template and its image-aware tokenization.

The prompt text is split at `<image>`; each chunk is tokenized on its own (BOS kept only on the very
first chunk of a conversation) and `IMAGE_TOKEN_ID` stands where an image's embeddings go, exactly as
MobileVLM's `tokenizer_image_token` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MobileVLMError
from .tokenizer import Tokenizer

IMAGE_TOKEN_ID = -200
IMAGE_PLACEHOLDER = "<image>"

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


def tokenize_with_images(tokenizer: Tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of `text` with `IMAGE_TOKEN_ID` for each `<image>`; BOS only before the first chunk."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        ids.extend(tokenizer.encode(chunk, add_bos=add_bos and i == 0))
    return ids


@dataclass
class Conversation:
    """Renders the `v1` prompt turn by turn, so that a chat can feed only what is new to the KV cache."""

    template: dict = field(default_factory=lambda: dict(V1_TEMPLATE))
    turns: int = 0

    def user_turn(self, message: str, with_image: bool) -> str:
        """Text to append for a new user message (image placeholder first, as MobileVLM's CLI does)."""
        t = self.template
        user, assistant = t["roles"]["user"], t["roles"]["assistant"]
        content = f"{IMAGE_PLACEHOLDER}\n{message}" if with_image else message
        prefix = t["system_message"] + t["seps"][0] if self.turns == 0 else t["seps"][-1]
        self.turns += 1
        return f"{prefix}{user}{t['role_content_sep']}{content}{t['seps'][0]}{assistant}{t['role_empty_sep']}"

