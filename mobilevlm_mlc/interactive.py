"""`mobilevlm-mlc chat`: the interactive multi-turn chat in a terminal, over one `ChatSession` (the
conversation stays in the KV cache between turns; the session drops the oldest turns when the window
fills). Answers stream token by token. Commands, as in MLC's `mlc_llm chat`:

    /image PATH   attach an image to the next message       /stats   the last turn's speed, KV tokens in use
    /reset        a new conversation                        /set k=v;k=v   sampling settings (temperature=0.7;top_p=0.9)
    /help         this list                                 /exit    leave (Ctrl-D too)

Ctrl-C during an answer stops that answer and keeps the conversation; Ctrl-C at the prompt leaves.
From a terminal the prompt has line editing and history (`readline`); from a pipe, lines are read one by
one without prompts, so a session can be scripted. Anything wrong inside the loop — a missing image, an
unknown command, a bad `/set` value, a message too long for the window — is one `error:` line on stderr,
and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from PIL import Image

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.chat import ChatSession
from mobilevlm_mlc.runtime.conversation import IMAGE_PLACEHOLDER
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.preprocess import load_image
from mobilevlm_mlc.runtime.sampling import GenerationConfig

PROMPT = ">>> "
HELP = __doc__.split("\n\n")[1]
SETTABLE = {  # /set key -> how its value is read
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
}


@dataclass
class TurnStats:
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    def line(self, kv_tokens: int) -> str:
        prefill = self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0
        decode = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        return (
            f"[stats] prefill {self.prefill_tokens} tokens, {prefill:.1f} tok/s; decode {self.decode_tokens} "
            f"tokens, {decode:.1f} tok/s; KV cache {kv_tokens} tokens in use"
        )


class ChatLoop:
    def __init__(self, engine: Engine, config: GenerationConfig, image: Path | None, out: TextIO, err: TextIO):
        self.engine, self.config, self.out, self.err = engine, config, out, err
        self.session: ChatSession = engine.chat()
        self.image: Image.Image | None = load_image(image) if image else None
        self.stats: TurnStats | None = None
        self._stop_answer = False

    def run(self, lines: Iterator[str]) -> None:
        try:
            for line in lines:
                if not self.handle(line.strip()):
                    break
        finally:
            self.session.close()

    def handle(self, line: str) -> bool:
        """One line of input; False when the loop should end."""
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.answer(line)
        except MobileVLMError as err:
            print(f"error: {err}", file=self.err, flush=True)
        return True

    def command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            print(HELP, file=self.out, flush=True)
        elif name == "/image":
            if not rest:
                raise MobileVLMError("/image: expected a path, e.g. /image photo.jpg")
            try:
                path = Path(rest).expanduser()
            except RuntimeError:  # ~user that does not exist
                path = Path(rest)
            self.image = load_image(path)
            print(f"[image {rest} attached to the next message]", file=self.err, flush=True)
        elif name == "/reset":
            self.session.close()
            self.session, self.image, self.stats = self.engine.chat(), None, None
            print("[new conversation]", file=self.err, flush=True)
        elif name == "/stats":
            if self.stats is None:
                raise MobileVLMError("/stats: no answer yet in this conversation")
            print(self.stats.line(self.session.length), file=self.out, flush=True)
        elif name == "/set":
            self.config = settings(self.config, rest)
            self.engine.check_generation(self.config)
        else:
            raise MobileVLMError(f"{name}: unknown command (/help lists them)")
        return True

    def answer(self, message: str) -> None:
        """Stream the answer to `message`; Ctrl-C ends it early, at a token boundary (the session stays
        whole: the generator is left at a yield, as the chat session allows)."""
        if IMAGE_PLACEHOLDER in message:
            raise MobileVLMError(f"the message may not hold {IMAGE_PLACEHOLDER!r}: attach images with /image PATH")
        self._stop_answer = False
        previous = signal.signal(signal.SIGINT, self._interrupt)
        started, first, tokens = time.perf_counter(), None, 0
        try:
            for delta in self.session.send_tokens(message, self.image, self.config):
                if first is None:
                    first = time.perf_counter()
                tokens += 1
                self.out.write(delta)
                self.out.flush()
                if self._stop_answer:
                    break
        finally:
            signal.signal(signal.SIGINT, previous)
            self.out.write("\n")
            self.out.flush()
        self.image = None  # an image goes with one message
        ended = time.perf_counter()
        result = self.session.last
        self.stats = TurnStats(
            result.prefill_tokens, (first or ended) - started, max(tokens - 1, 0), ended - (first or ended)
        )
        if self._stop_answer:
            print("[answer stopped]", file=self.err, flush=True)

    def _interrupt(self, _signum, _frame) -> None:
        self._stop_answer = True


def settings(config: GenerationConfig, text: str) -> GenerationConfig:
    """`config` with `/set temperature=0.7;top_p=0.9` applied (checked as GenerationConfig checks)."""
    changes = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in SETTABLE:
            raise MobileVLMError(f"/set {item}: expected KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        try:
            changes[key] = SETTABLE[key](value) if not (key == "seed" and value == "none") else None
        except ValueError:
            raise MobileVLMError(
                f"/set {key}={value}: expected {'an integer' if SETTABLE[key] is int else 'a number'}"
            ) from None
    if not changes:
        raise MobileVLMError("/set: expected KEY=VALUE[;KEY=VALUE...], e.g. /set temperature=0.7;top_p=0.9")
    return dataclasses.replace(config, **changes)


def terminal_lines() -> Iterator[str]:
    """Lines typed at the prompt (readline editing and history); ends at Ctrl-D, or Ctrl-C at the prompt."""
    try:
        import readline  # noqa: F401 - imported for its side effect on input()
    except ImportError:
        pass
    while True:
        try:
            yield input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stdout, flush=True)
            return


def chat(engine: Engine, config: GenerationConfig, image: Path | None) -> None:
    """The loop on this process's terminal, or on its piped stdin."""
    loop = ChatLoop(engine, config, image, sys.stdout, sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print("MobileVLM chat: /help lists the commands, /exit or Ctrl-D leaves", file=sys.stderr, flush=True)
    loop.run(terminal_lines() if interactive else iter(sys.stdin.readline, ""))
