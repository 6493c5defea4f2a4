"""Continuous batching: one thread owns the engine and, step after step, admits waiting requests while the
KV cache has pages for them, prefills the admitted ones together (`batch_prefill`, chunked at the library's
`prefill_chunk_size` by `Engine.prefill`), and advances every running sequence by one token with one
`batch_decode` call. A request that was cancelled (its client went away) is dropped, and its pages freed,
at the next step.

A request is admitted onto the longest prefix the prefix cache holds for it (a fork: whole pages are
shared, only the rest of the prompt is prefilled), and reserves its own pages for the rest of its prompt
and all of `max_tokens`, so a running sequence never runs out of pages and nothing needs preempting. Cached
sequences give their pages back, least recently used first, when a request needs them. A sequence that
finishes is kept in the prefix cache.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.kv_cache import KV_PAGE_SIZE, pages
from mobilevlm_mlc.runtime.sampling import GenerationConfig, Sampler
from mobilevlm_mlc.runtime.tokenizer import StreamDecoder

from .metrics import ServerMetrics
from .prefix_cache import PrefixCache, prompt_after, prompt_positions


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    key: tuple[list[np.ndarray], list] | None = None  # its images' RGB bytes and its KV positions, once made


@dataclass(eq=False)
class _Sequence:
    request: Request
    seq_id: int
    sampler: Sampler
    decoder: StreamDecoder
    pixels: list[np.ndarray]  # the images' RGB bytes, as `image_embed` takes them
    positions: list  # what fills each of its KV positions (the prefix cache's key)
    start: int  # KV positions taken from the sequence it was forked from
    reserved: int  # KV tokens reserved for its own pages
    length: int = 0  # tokens in the KV cache
    token: int | None = None  # sampled, not yet fed
    held: str = ""  # text held back: it could be the start of a stop string
    last_token_at: float = 0.0

    @property
    def own_from(self) -> int:
        return _own_from(self.start)


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int, metrics: ServerMetrics, prefix_cache: int):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.capacity = engine.free_kv_tokens()  # every page, before any sequence
        self.image_tokens = engine.dist.config.num_image_tokens
        self.cache = PrefixCache(engine, prefix_cache)
        self.max_sequences = engine.max_sequences
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mobilevlm-scheduler", daemon=True)

    # ---- the request side (event loop thread) ------------------------------------------------------

    def start(self, preamble: list[int]) -> None:
        """Start the loop, with `preamble` (the tokens every conversation in the template's own system
        message begins with) in the prefix cache: the first requests share it too."""
        if (
            self.cache.capacity
            and KV_PAGE_SIZE < len(preamble)
            and pages(len(preamble)) * KV_PAGE_SIZE <= self.capacity
        ):
            seq_id = self.engine.add_sequence()
            try:
                self.engine.prefill([seq_id], [self.engine.prompt(preamble, [])])
            except Exception:  # noqa: BLE001 - only an optimization: the server serves without it
                self.engine.remove_sequence(seq_id)
            else:
                self.cache.retain(seq_id, prompt_positions(preamble, [], self.image_tokens))
            self.metrics.cached_sequences.set(len(self.cache))
        self.metrics.kv_free_pages.set(self.engine.free_kv_tokens() // KV_PAGE_SIZE)  # before the first step
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def budget(self, request: Request, start: int = 0) -> int:
        """KV tokens of the pages a request fills itself, to its last possible token, when its sequence is
        forked at `start` (0: not forked, all of its prompt and every token it may generate)."""
        return pages(request.prompt_tokens - _own_from(start) + request.config.max_new_tokens) * KV_PAGE_SIZE

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
        """End every running and waiting request with an error, freeing their pages (as far as a KV cache
        that just failed a step still can: the loop must go on and every client be told)."""
        for sequence in list(self.running):
            with contextlib.suppress(Exception):
                self._free(sequence)
            sequence.request.emit("error", message)
        with self._wake:
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.metrics.waiting.set(0)
        for request in waiting:
            request.emit("error", message)
        with contextlib.suppress(Exception):
            self.cache.clear()  # after a failed step the KV cache's contents are not to be trusted
        self.metrics.cached_sequences.set(0)

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
        """Waiting requests, oldest first, while a sequence slot and KV pages for them are free."""
        admitted = []
        while self.waiting and len(self.running) < self.max_sequences:
            request = self.waiting[0]  # only this thread takes from the queue
            sequence = None if request.cancelled.is_set() else self._place(request)
            if sequence is False:
                break  # no room yet: it stays first in line
            with self._wake:
                self.waiting.popleft()
            if sequence is not None:
                admitted.append(sequence)
                self.running.append(sequence)
        with self._wake:
            self.metrics.waiting.set(len(self.waiting))
        self.metrics.cached_sequences.set(len(self.cache))
        return admitted

    def _room(self) -> tuple[int, int]:
        """(KV tokens a new sequence may take now: the free pages less what running sequences reserved and
        have not filled; at most what evicting every kept sequence would add: the pages in use that no
        running sequence fills itself, some of which running forks share and keep)."""
        free = self.engine.free_kv_tokens()
        filled = sum(pages(s.length - s.own_from) * KV_PAGE_SIZE for s in self.running)
        unfilled = sum(s.reserved for s in self.running) - filled
        return free - unfilled, self.capacity - free - filled

    def _place(self, request: Request) -> _Sequence | None | bool:
        """A sequence for `request` in the KV cache, forked from the cache's longest shared prefix; False
        while its pages are not free (cached sequences are evicted first); None if it failed (told)."""
        if request.key is None:  # once: a request may wait several steps for room
            try:
                pixels = [self.engine.pixels(image) for image in request.images]
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                request.emit("error", str(err) if isinstance(err, MobileVLMError) else first_line(err))
                return None
            request.key = pixels, prompt_positions(request.prompt_ids, pixels, self.image_tokens)
        pixels, positions = request.key
        parent, start = self.cache.match(positions)
        room, held = self._room()
        if room + held - _own_from(start) < self.budget(request, start) and room + held < self.budget(request):
            return False  # running sequences hold the room it needs: evicting would only empty the cache
        while self._room()[0] < self.budget(request, start):
            if self.cache.evict(keep=parent):
                continue
            if parent is None:
                return False
            self.cache.evict()  # the shared prefix itself: all of the prompt will be prefilled
            parent, start = None, 0
        seq_id = self.engine.fork_sequence(parent, start) if parent is not None else self.engine.add_sequence()
        request.images, request.key, request.cached_tokens = [], None, start  # the sequence holds them now
        self.metrics.cached_prompt_tokens.inc(start)
        sampler, decoder = Sampler(request.config), StreamDecoder(self.engine.tokenizer)
        return _Sequence(
            request, seq_id, sampler, decoder, pixels, positions, start, self.budget(request, start), start
        )

    def _prefill(self, admitted: list[_Sequence]) -> None:
        engine, prompts, ready = self.engine, [], []
        for sequence in admitted:
            request = sequence.request
            try:
                ids, pixels = prompt_after(request.prompt_ids, sequence.pixels, self.image_tokens, sequence.start)
                prompts.append(engine.prompt(ids, [engine.image_embed(p) for p in pixels]))
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                self._finish(sequence, "error", str(err) if isinstance(err, MobileVLMError) else first_line(err))
                continue
            sequence.pixels = []  # embedded
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
                sequence.positions.append(sequence.token)
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
        if kind == "done" and sequence in self.running:  # its KV is whole: kept for requests that begin the same
            self.running.remove(sequence)
            self.cache.retain(sequence.seq_id, sequence.positions)
            self.metrics.cached_sequences.set(len(self.cache))
        else:
            self._free(sequence)
        sequence.request.emit(kind, detail)

    def _free(self, sequence: _Sequence) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence.seq_id >= 0:
            self.engine.remove_sequence(sequence.seq_id)
            sequence.seq_id = -1


def _own_from(start: int) -> int:
    """The first position on a page of its own of a sequence forked at `start` (the fork copies the page
    that `start` falls in)."""
    return start - start % KV_PAGE_SIZE


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until it is decided)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
