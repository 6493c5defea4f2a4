"""MobileVLM's `v1` conversation template and its image-aware tokenization.

The prompt text is split at `<image>`; each chunk is tokenized on its own (BOS kept only on the very
first chunk of a conversation) and `IMAGE_TOKEN_ID` stands where an image's embeddings go, exactly as
MobileVLM's `tokenizer_image_token` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mobilevlm_mlc.errors import MobileVLMError
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


def preamble(template: dict) -> str:
    """The text every conversation in the template's own system message begins with: up to the first
    user message's content (what a server keeps prefilled for all of them)."""
    return template["system_message"] + template["seps"][0] + template["roles"]["user"] + template["role_content_sep"]


def render_chat(template: dict, messages: list[tuple[str, str]]) -> str:
    """A whole conversation as one prompt (a server's request), as MobileVLM's `v1` template renders it:
    `messages` are (role, text) with `<image>` where an image stands; a leading 'system' message replaces
    the template's system message, then user and assistant alternate and a user message comes last.
    A finished turn is `ROLE: text` and its separator (`</s>` after an answer), the open one `ASSISTANT:`."""
    roles = [role for role, _ in messages]
    system = template["system_message"]
    if roles and roles[0] == "system":
        system, messages = messages[0][1], messages[1:]
    for i, (role, _) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            index = i + (len(roles) - len(messages))
            raise MobileVLMError(
                f"messages[{index}].role is {role!r}, expected {expected!r} "
                "(an optional system message first, then user and assistant in turn)"
            )
    if not messages or messages[-1][0] != "user":
        raise MobileVLMError("messages: the last message must be the user's")
    t = template
    text = system + t["seps"][0]
    for i, (role, content) in enumerate(messages):
        text += f"{t['roles'][role]}{t['role_content_sep']}{content}{t['seps'][i % 2]}"
    return text + f"{t['roles']['assistant']}{t['role_empty_sep']}"
