"""MobileVLM's `v1` conversation template and its image-aware tokenization.

The prompt text is split at `<image>`; each chunk is tokenized on its own (BOS kept only on the very
first chunk of a conversation) and `IMAGE_TOKEN_ID` stands where an image's embeddings go, exactly as
MobileVLM's `tokenizer_image_token` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mobilevlm_mlc.formats.dist import V1_TEMPLATE

from .tokenizer import Tokenizer

IMAGE_TOKEN_ID = -200
IMAGE_PLACEHOLDER = "<image>"


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
