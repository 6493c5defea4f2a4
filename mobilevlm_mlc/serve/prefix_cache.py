"""Prefix caching: a finished sequence stays in the paged KV cache, and a new request whose prompt begins
the same way forks it (`kv_state_fork_sequence`) and prefills only the rest, as MLC's engine does with
its recycled sequences. Every request with the template's own system message shares that message; a
chat's next turn resends the whole conversation, its image included, and shares all of it but the new turn.

A sequence is keyed by what fills each of its KV positions: the token id, or (image digest, row) for
each of an image's tokens, the digest taken of the RGB bytes `image_embed` is given. A fork shares the
whole pages before its position and copies the page it falls in (TVM's `ForkSequence`); it is made only
when at least a page is shared, and never inside an image (the rest of a prompt starts with whole images).
The cache holds at most `capacity` sequences, least recently used first out; the scheduler evicts them
sooner when a request needs their pages.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Hashable

import numpy as np

from mobilevlm_mlc.runtime.conversation import IMAGE_TOKEN_ID
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.kv_cache import KV_PAGE_SIZE


def prompt_positions(prompt_ids: list[int], pixels: list[np.ndarray], image_tokens: int) -> list[Hashable]:
    """What fills each KV position of a prompt: a token id, or (image digest, row) for each image token."""
    digests = iter(hashlib.blake2b(p.tobytes() + repr(p.shape).encode(), digest_size=16).digest() for p in pixels)
    positions: list[Hashable] = []
    for token in prompt_ids:
        if token == IMAGE_TOKEN_ID:
            digest = next(digests)
            positions.extend((digest, row) for row in range(image_tokens))
        else:
            positions.append(token)
    return positions


def prompt_after(prompt_ids: list[int], pixels: list[np.ndarray], image_tokens: int, start: int):
    """The prompt's ids and images from KV position `start` on (`start` is not inside an image)."""
    position, images = 0, iter(pixels)
    for i, token in enumerate(prompt_ids):
        if position == start:
            return prompt_ids[i:], list(images)
        if token == IMAGE_TOKEN_ID:
            next(images)
            position += image_tokens
        else:
            position += 1
    raise ValueError(f"position {start} is not where a token or an image of the prompt begins")


def _common_length(a: list[Hashable], b: list[Hashable], limit: int) -> int:
    n, step = 0, 64
    limit = min(limit, len(a), len(b))
    while n + step <= limit and a[n : n + step] == b[n : n + step]:  # list slices compare in C
        n += step
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """Finished sequences kept in the engine's KV cache, by what fills their positions."""

    def __init__(self, engine: Engine, capacity: int):
        self.engine = engine
        self.capacity = capacity
        self.entries: collections.OrderedDict[int, list[Hashable]] = collections.OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, positions: list[Hashable]) -> tuple[int | None, int]:
        """The cached sequence sharing the longest prefix with `positions`, and where to fork it: not inside
        an image, short of the last position (whose logits start the answer). (None, 0) when that shares
        less than a page."""
        best, longest = None, 0
        for seq_id, key in self.entries.items():
            n = _common_length(key, positions, len(positions) - 1)
            if n > longest:
                best, longest = seq_id, n
        start = longest
        if isinstance(positions[start], tuple):  # inside an image: fork where it begins
            start -= positions[start][1]
        if best is None or start < KV_PAGE_SIZE:
            return None, 0
        self.entries.move_to_end(best)
        return best, start

    def retain(self, seq_id: int, positions: list[Hashable]) -> None:
        """Keep a finished sequence (`positions` fill its KV) instead of removing it. A cached sequence that
        it extends adds nothing and goes; past `capacity`, the least recently used goes."""
        if not self.capacity:
            self.engine.remove_sequence(seq_id)
            return
        for old, key in list(self.entries.items()):
            if len(key) <= len(positions) and _common_length(key, positions, len(key)) == len(key):
                self.remove(old)
        self.entries[seq_id] = positions
        while len(self.entries) > self.capacity:
            self.evict()

    def evict(self, keep: int | None = None) -> bool:
        """Remove the least recently used sequence but `keep`; False when there is none."""
        victim = next((seq_id for seq_id in self.entries if seq_id != keep), None)
        if victim is None:
            return False
        self.remove(victim)
        return True

    def remove(self, seq_id: int) -> None:
        del self.entries[seq_id]
        self.engine.remove_sequence(seq_id)

    def clear(self) -> None:
        """Remove every kept sequence; all are forgotten even if the KV cache refuses a removal."""
        kept, self.entries = list(self.entries), collections.OrderedDict()
        for seq_id in kept:
            self.engine.remove_sequence(seq_id)
