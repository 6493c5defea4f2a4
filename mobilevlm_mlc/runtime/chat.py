"""Multi-turn chat on one sequence of the paged KV cache, and its context-window policy.

Each turn prefills only its new tokens. At the context window the session drops its oldest turns, as
chat apps do: when a turn's prompt plus `min(max_new_tokens, window // 4)` answer tokens would not fit
after what the session holds, the oldest turns (with their images) go until the rest, re-rendered from
the system prompt, and the new message fill at most half the window; that history is re-prefilled in a
fresh sequence (`TurnResult.dropped_turns` says how many went). A message that alone does not fit the
window is refused with a MobileVLMError, and the session is left as it was. `plan_turn` is that policy,
as a function of token counts alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tvm
from PIL import Image

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE

from .conversation import Conversation, tokenize_with_images
from .kv_cache import pages
from .sampling import GenerationConfig, Sampler
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class TurnSize:
    """Tokens a turn takes in the KV cache (its image as its image tokens), rendered as the
    conversation's first turn (BOS, system prompt) or as a later one; its answer included."""

    first: int
    later: int


@dataclass(frozen=True)
class TurnPlan:
    dropped: int  # oldest turns dropped before this one
    rerender: bool  # the kept history is re-prefilled into a fresh sequence
    size: int  # tokens this turn's prefill adds
    pages: int  # KV cache pages it takes beyond what the sequence holds (after giving its own back, if re-rendered)


def plan_turn(
    held: list[TurnSize],
    new: TurnSize,
    cached_tokens: int,
    pending_tokens: int,
    window: int,
    max_new_tokens: int,
    free_tokens: int,
) -> TurnPlan:
    """How the next turn fits: `held` are the turns the sequence holds (`cached_tokens` in the cache, plus
    `pending_tokens` generated but not yet fed), `new` the message; `free_tokens` is what the shared
    cache has free. Raises a MobileVLMError when it cannot fit the window or the cache."""
    size = pending_tokens + (new.later if held else new.first)
    rerender = bool(held) and cached_tokens + size + min(max_new_tokens, window // 4) > window
    dropped = _turns_to_drop(held, new, window // 2) if rerender else 0
    if rerender:
        kept = held[dropped:]
        size = kept[0].first + sum(t.later for t in kept[1:]) + new.later if kept else new.first
    if size >= window:
        raise MobileVLMError(
            f"prompt of {size} tokens (with image tokens) does not fit the context window of {window} tokens"
        )
    start = 0 if rerender else cached_tokens  # a re-prefill gives this sequence's pages back first
    needed = pages(start + size) - pages(start) - (pages(cached_tokens) if rerender else 0)
    if needed * KV_PAGE_SIZE > free_tokens:
        raise MobileVLMError(
            f"prompt of {size} tokens does not fit the KV cache: {free_tokens} tokens free (close other chat sessions)"
        )
    return TurnPlan(dropped, rerender, size, needed)


def _turns_to_drop(held: list[TurnSize], new: TurnSize, budget: int) -> int:
    """How many of the oldest turns must go for the rest plus `new` to fill at most `budget` tokens."""
    later = [t.later for t in held[1:]] + [new.later]
    for start, kept in enumerate(held):
        if kept.first + sum(later[start:]) <= budget:
            return start
    return len(held)


@dataclass
class TurnResult:
    """What one chat turn fed and produced (the CLI's `--output-json`)."""

    prompt_token_ids: list[int]  # what this turn prefilled (after a drop: the kept history, then the message)
    output_token_ids: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None
    finish_reason: str = ""
    dropped_turns: int = 0  # oldest turns dropped to fit the context window before this one
    prefill_tokens: int = 0  # KV cache rows its prefill fed (images as their tokens)


@dataclass
class _Turn:
    """One exchange of a chat, kept so that the history can be re-prefilled after dropping older turns."""

    message: str
    image: tvm.runtime.Tensor | None  # its image tokens [n, hidden] on the device, if it had an image
    output_token_ids: list[int] = field(default_factory=list)
    size: tuple[int, TurnSize] | None = None  # (answer length it was computed for, the sizes)


@dataclass
class _Generation:
    """The turn a session is answering."""

    turn: _Turn
    result: TurnResult
    config: GenerationConfig
    sampler: Sampler
    stream: StreamDecoder
    size: int  # tokens its prefill feeds
    rerender: bool


class ChatSession:
    """A conversation in the dist's template (MobileVLM's `v1`) on one sequence of the engine's cache."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.seq_id = engine.add_sequence()
        self.template = dict(engine.dist.chat_config["conv_template"])
        self.turns: list[_Turn] = []  # the history the KV cache holds (the oldest may have been dropped)
        self.length = 0  # tokens in the KV cache
        self.pending: list[int] = []  # generated but not yet fed (the turn ended on max_new_tokens)
        self.last: TurnResult | None = None
        self._generation: _Generation | None = None

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if self.seq_id is not None:
            self.engine.remove_sequence(self.seq_id)
            self.seq_id = None
            self.turns = []

    def _turn_ids(self, turn: _Turn, first: bool) -> list[int]:
        """`turn` rendered as the conversation's first turn (BOS, system prompt) or a later one, with its answer."""
        text = Conversation(template=self.template, turns=0 if first else 1).user_turn(
            turn.message, with_image=turn.image is not None
        )
        return tokenize_with_images(self.engine.tokenizer, text, add_bos=first) + turn.output_token_ids

    def _size(self, turn: _Turn) -> TurnSize:
        """Its sizes, kept once the turn is history (its answer no longer grows): each turn is rendered
        and tokenized for sizing once, not at every later message."""
        if turn.size is None or turn.size[0] != len(turn.output_token_ids):
            image_tokens = (
                int(turn.image.shape[0]) - 1 if turn.image is not None else 0
            )  # the placeholder becomes the image
            size = TurnSize(*(len(self._turn_ids(turn, first)) + image_tokens for first in (True, False)))
            turn.size = (len(turn.output_token_ids), size)
        return turn.size[1]

    def send(
        self, message: str, image: Image.Image | Path | str | None = None, config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Stream the answer to `message` (and `image`, if given) as text deltas."""
        return (delta for delta in self.send_tokens(message, image, config) if delta)

    def send_tokens(
        self, message: str, image: Image.Image | Path | str | None = None, config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Like `send`, but yields once per generated token (its text delta, possibly empty)."""
        engine = self.engine
        prompt, _ = self._begin(message, image, config, engine.free_kv_tokens())
        [logits] = engine.prefill([self.seq_id], [prompt])
        self._prefilled(logits)
        while True:
            [token] = engine.sample(logits, [self._generation.sampler])
            delta = self._accept(token)
            if delta is None:
                return
            yield delta
            if not self._continues(engine.free_kv_tokens()):
                return
            logits = engine.decode([self.seq_id], [token])
            self._fed()

    # ---- the steps of a turn (`send_tokens` for one session, `run_turns` for several) -----------------

    def _begin(
        self, message: str, image: Image.Image | Path | str | None, config: GenerationConfig | None, free_tokens: int
    ) -> tuple[list[tvm.runtime.Tensor], int]:
        """Plan the turn for `free_tokens` free in the cache; its prompt parts, and the KV cache tokens it takes."""
        engine, config = self.engine, config or GenerationConfig()
        engine.check_generation(config)
        window = engine.context_window_size
        turn = _Turn(message, engine.image_embed(engine.pixels(image)) if image is not None else None)
        plan = plan_turn(
            [self._size(t) for t in self.turns],
            self._size(turn),
            self.length,
            len(self.pending),
            window,
            config.max_new_tokens,
            free_tokens,
        )
        if plan.rerender:  # the kept history goes into a fresh sequence
            engine.remove_sequence(self.seq_id)
            self.seq_id, self.length, self.turns = engine.add_sequence(), 0, self.turns[plan.dropped :]
            history = self.turns + [turn]
            ids = [i for k, t in enumerate(history) for i in self._turn_ids(t, first=k == 0)]
        else:
            history = [turn]
            ids = self.pending + self._turn_ids(turn, first=not self.turns)
        prompt = engine.prompt(ids, [t.image for t in history if t.image is not None])
        self.pending = []
        result = self.last = TurnResult(
            prompt_token_ids=list(ids), output_token_ids=turn.output_token_ids, dropped_turns=plan.dropped
        )
        size = result.prefill_tokens = sum(int(part.shape[0]) for part in prompt)
        self._generation = _Generation(
            turn, result, config, Sampler(config), StreamDecoder(engine.tokenizer), size, plan.rerender
        )
        return prompt, plan.pages * KV_PAGE_SIZE

    def _prefilled(self, logits: tvm.runtime.Tensor) -> None:
        generation = self._generation
        if generation.rerender:
            self.engine.release_workspace()
        self.length += generation.size
        self.turns.append(generation.turn)
        generation.result.first_logits = logits.numpy()[0, -1]  # before the processors change them

    def _accept(self, token: int) -> str | None:
        """The sampled token: its text delta, or None when it ends the turn (a stop token)."""
        generation = self._generation
        if token in self.engine.stop_token_ids:
            generation.result.finish_reason = "stop"
            return None
        generation.turn.output_token_ids.append(token)
        self.pending = [token]  # until it is fed (a caller may stop iterating at the yield)
        return generation.stream.push(token)

    def _continues(self, free_tokens: int) -> bool:
        """Whether the accepted token is fed for another one: not at max_new_tokens, the window's end, or
        when it would need a page and `free_tokens` (shared with other sessions) is 0."""
        generation, window = self._generation, self.engine.context_window_size
        out_of_pages = self.length % KV_PAGE_SIZE == 0 and free_tokens == 0
        if (
            len(generation.turn.output_token_ids) >= generation.config.max_new_tokens
            or self.length + 1 >= window
            or out_of_pages
        ):
            generation.result.finish_reason = "length"
            return False
        return True

    def _fed(self) -> None:
        self.pending = []
        self.length += 1


def run_turns(
    engine: Engine, requests: list[tuple[ChatSession, str, Image.Image | Path | str | None, GenerationConfig | None]]
) -> None:
    """One turn of each session together: all prompts prefilled in `batch_prefill` calls, then each
    token step of all live sessions in one `batch_decode` call (the engine picks the single-sequence
    functions when one is left), tokens drawn in one `softmax_with_temperature` call per step."""
    free, prompts = engine.free_kv_tokens(), []
    for session, message, image, config in requests:
        prompt, tokens = session._begin(message, image, config, free)
        prompts.append(prompt)
        free -= tokens
    sessions = [request[0] for request in requests]
    rows = engine.prefill([s.seq_id for s in sessions], prompts)
    for session, logits in zip(sessions, rows):
        session._prefilled(logits)
    live = [(s, engine.sample(logits, [s._generation.sampler])[0]) for s, logits in zip(sessions, rows)]
    while live:
        free, feeding = engine.free_kv_tokens(), []
        for session, token in live:
            if session._accept(token) is not None and session._continues(free):
                free -= KV_PAGE_SIZE if session.length % KV_PAGE_SIZE == 0 else 0  # this step opens a page
                feeding.append((session, token))
        if not feeding:
            return
        logits = engine.decode([s.seq_id for s, _ in feeding], [t for _, t in feeding])
        for session, _ in feeding:
            session._fed()
        tokens = engine.sample(logits, [s._generation.sampler for s, _ in feeding])
        live = [(session, token) for (session, _), token in zip(feeding, tokens)]
