"""Continuous batching: one thread owns the engine and, step after step, admits waiting requests while the
KV cache has pages for them, prefills the admitted ones together (`batch_prefill`, chunked at the library's
`prefill_chunk_size` by `Engine.prefill`), and advances every running sequence by one token with one
`batch_decode` call. A request that was cancelled (its client went away) is dropped, and its pages freed,
at the next step.

Admission reserves a request's whole budget — prompt plus `max_tokens`, in KV pages — so a running
sequence never runs out of pages and nothing needs preempting; what is not reserved is free for the next.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.kv_cache import KV_PAGE_SIZE, pages
from mobilevlm_mlc.runtime.sampling import GenerationConfig, Sampler
from mobilevlm_mlc.runtime.tokenizer import StreamDecoder

from .metrics import ServerMetrics


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later."""


@dataclass(eq=False)  # compared by identity: a request holds decoded images
class Request:
    """One chat completion, as the scheduler runs it. `emit` is called from the scheduler thread with
    ("delta", text), then ("done", finish_reason) or ("error", message)."""

    prompt_ids: list[int]  # IMAGE_TOKEN_ID where each image goes
    images: list[Image.Image]
    prompt_tokens: int  # image tokens included
    config: GenerationConfig
    stop: list[str]
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    request: Request
    seq_id: int
    sampler: Sampler
    decoder: StreamDecoder
    reserved: int  # KV tokens held for it
    length: int = 0  # tokens in the KV cache
    token: int | None = None  # sampled, not yet fed
    held: str = ""  # text held back: it could be the start of a stop string
    last_token_at: float = 0.0


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int, metrics: ServerMetrics):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.capacity = engine.free_kv_tokens()  # every page, before any sequence
        self.max_sequences = engine.max_sequences
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mobilevlm-scheduler", daemon=True)

    # ---- the request side (event loop thread) ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def budget(self, request: Request) -> int:
        """KV tokens a request reserves: its prompt and every token it may generate."""
        return pages(request.prompt_tokens + request.config.max_new_tokens) * KV_PAGE_SIZE

    def submit(self, request: Request) -> None:
        if self.budget(request) > self.capacity:
            raise MobileVLMError(
                f"the request needs {self.budget(request)} KV cache tokens (prompt {request.prompt_tokens} + "
                f"max_tokens {request.config.max_new_tokens}); the server holds {self.capacity}"
            )
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(request)
            self.metrics.waiting.set(len(self.waiting))
            self._wake.notify()

    # ---- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception as err:  # noqa: BLE001 - the loop must outlive any one step's failure
                self._fail_all(f"the engine failed a step ({first_line(err)})")
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        """End every running and waiting request with an error, freeing their pages."""
        for sequence in list(self.running):
            self._finish(sequence, "error", message)
        with self._wake:
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.metrics.waiting.set(0)
        for request in waiting:
            request.emit("error", message)

    def _step(self) -> None:
        for sequence in [s for s in self.running if s.request.cancelled.is_set()]:
            self._free(sequence)
        with self._wake:  # a cancelled request waiting anywhere in the queue leaves it now
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled.is_set())
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        feeding = [s for s in self.running if s not in admitted]
        if feeding:
            self._decode(feeding)
        self.metrics.running.set(len(self.running))
        self.metrics.kv_free_pages.set(self.engine.free_kv_tokens() // KV_PAGE_SIZE)

    def _admit(self) -> list[_Sequence]:
        """Waiting requests, oldest first, while a sequence slot and their KV budget are free."""
        free = self.capacity - sum(s.reserved for s in self.running)
        admitted = []
        with self._wake:
            while self.waiting and len(self.running) < self.max_sequences:
                request = self.waiting[0]
                if request.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                need = self.budget(request)
                if need > free:
                    break
                self.waiting.popleft()
                free -= need
                sequence = _Sequence(request, -1, Sampler(request.config), StreamDecoder(self.engine.tokenizer), need)
                admitted.append(sequence)
                self.running.append(sequence)
            self.metrics.waiting.set(len(self.waiting))
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        engine, prompts, ready = self.engine, [], []
        for sequence in admitted:
            request = sequence.request
            try:
                images = [engine.image_embed(engine.pixels(image)) for image in request.images]
                prompt = engine.prompt(request.prompt_ids, images)
                sequence.seq_id = engine.add_sequence()
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                self._finish(sequence, "error", str(err) if isinstance(err, MobileVLMError) else first_line(err))
                continue
            request.images = []  # embedded: the decoded pictures are not needed any more
            prompts.append(prompt)
            ready.append(sequence)
        if not ready:
            return
        try:
            rows = engine.prefill([s.seq_id for s in ready], prompts)
            for sequence, logits in zip(ready, rows):
                sequence.length = sequence.request.prompt_tokens
                [token] = engine.sample(logits, [sequence.sampler])
                self._accept(sequence, token)
        except Exception as err:  # noqa: BLE001 - one failed step ends its requests, not the server
            for sequence in ready:
                if sequence in self.running:
                    self._finish(sequence, "error", first_line(err))

    def _decode(self, feeding: list[_Sequence]) -> None:
        engine = self.engine
        try:
            logits = engine.decode([s.seq_id for s in feeding], [s.token for s in feeding])
            for sequence in feeding:
                sequence.length += 1
            tokens = engine.sample(logits, [s.sampler for s in feeding])
            for sequence, token in zip(feeding, tokens):
                self._accept(sequence, token)
        except Exception as err:  # noqa: BLE001 - one failed step ends its requests, not the server
            for sequence in feeding:
                if sequence in self.running:
                    self._finish(sequence, "error", first_line(err))

    def _accept(self, sequence: _Sequence, token: int) -> None:
        """A sampled token: stream its text (minus what could begin a stop string), or end the request."""
        request, now = sequence.request, time.perf_counter()
        if request.completion_tokens == 0:
            self.metrics.time_to_first_token.observe(now - request.arrived)
        else:
            self.metrics.time_per_output_token.observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        if token in self.engine.stop_token_ids:
            if sequence.held:  # it did not become a stop string
                request.emit("delta", sequence.held)
            self._finish(sequence, "done", "stop")
            return
        request.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        text = sequence.held + sequence.decoder.push(token)
        stops = [(text.find(s), s) for s in request.stop if s in text]
        if stops:
            cut = min(stops)[0]
            if cut:
                request.emit("delta", text[:cut])
            self._finish(sequence, "done", "stop")
            return
        keep = _stop_prefix(text, request.stop)
        sequence.held = text[len(text) - keep :] if keep else ""
        if len(text) > keep:
            request.emit("delta", text[: len(text) - keep])
        if (
            request.completion_tokens >= request.config.max_new_tokens
            or sequence.length + 1 >= self.engine.context_window_size
        ):
            if sequence.held:
                request.emit("delta", sequence.held)
            self._finish(sequence, "done", "length")
            return
        sequence.token = token

    def _finish(self, sequence: _Sequence, kind: str, detail: str) -> None:
        self._free(sequence)
        sequence.request.emit(kind, detail)

    def _free(self, sequence: _Sequence) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence.seq_id >= 0:
            self.engine.remove_sequence(sequence.seq_id)
            sequence.seq_id = -1


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until it is decided)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
