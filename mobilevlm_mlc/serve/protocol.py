"""OpenAI's chat-completions request, as this server takes it, and OpenAI's error object.

Types are checked strictly (a string where a number goes is refused, not coerced); parameters OpenAI
clients send that we ignore harmlessly (`user`, `metadata`, ...) pass; the ones that would change the
answer and that we do not do (`n` > 1, tools, response formats, log probabilities) are refused by name.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    # refused when given (they would change what comes back)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> str | None:
        """The first parameter this server does not do, or None."""
        if self.n not in (None, 1):
            return "n"
        for name in ("tools", "tool_choice", "functions", "function_call", "response_format", "top_logprobs"):
            if getattr(self, name) is not None:
                return name
        return "logprobs" if self.logprobs else None


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict)$|[\[A-Z-]")  # pydantic's names of union members


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(param, message) of pydantic's most specific validation error, named the way the JSON names it:
    `messages[0].content[1].image_url`."""
    error = max(errors, key=lambda e: len(e.get("loc", ())))  # in a union, the branch that got furthest
    param, previous = "", None
    for part in error.get("loc", ()):
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _UNION_MEMBER.search(part) and part != previous:  # a tagged union repeats its tag
            param += f".{part}" if param else part
        previous = part
    return param, f"{param or 'body'}: {error.get('msg', 'invalid')}"
