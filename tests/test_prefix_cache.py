"""The prefix cache's keys and choices, on the engine's own KV cache (the server's use of it, answers
included, is in test_serve)."""

from __future__ import annotations

import numpy as np
import pytest

from mobilevlm_mlc.runtime.conversation import IMAGE_TOKEN_ID
from mobilevlm_mlc.serve.prefix_cache import PrefixCache, prompt_after, prompt_positions

IMAGE_TOKENS = 4


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)


def test_positions_name_each_token_and_each_row_of_an_image_by_its_bytes():
    a, b = picture(0), picture(1)
    positions = prompt_positions([1, 5, IMAGE_TOKEN_ID, 7], [a], IMAGE_TOKENS)
    assert len(positions) == 3 + IMAGE_TOKENS and positions[:2] == [1, 5] and positions[-1] == 7
    assert [row for _, row in positions[2:6]] == [0, 1, 2, 3] and len({d for d, _ in positions[2:6]}) == 1
    assert prompt_positions([IMAGE_TOKEN_ID], [a.copy()], IMAGE_TOKENS) == positions[2:6]
    assert prompt_positions([IMAGE_TOKEN_ID], [b], IMAGE_TOKENS)[0] != positions[2]
    # the same bytes in another shape are another image
    assert prompt_positions([IMAGE_TOKEN_ID], [a.reshape(1, 4, 16, 3)], IMAGE_TOKENS)[0] != positions[2]


def test_the_rest_of_a_prompt_starts_at_a_token_or_a_whole_image():
    a = picture(0)
    ids = [1, 5, IMAGE_TOKEN_ID, 7, 8]
    assert prompt_after(ids, [a], IMAGE_TOKENS, 2) == ([IMAGE_TOKEN_ID, 7, 8], [a])
    assert prompt_after(ids, [a], IMAGE_TOKENS, 2 + IMAGE_TOKENS) == ([7, 8], [])
    assert prompt_after(ids, [a], IMAGE_TOKENS, 3 + IMAGE_TOKENS) == ([8], [])


def test_match_forks_the_longest_shared_prefix_of_a_page_or_more_never_inside_an_image(ldpnet_engine):
    engine = ldpnet_engine
    cache = PrefixCache(engine, capacity=3)
    a = picture(0)
    text = list(range(10, 50))  # 40 tokens
    with_image = prompt_positions([1, *range(10, 30), IMAGE_TOKEN_ID, 99], [a], 16)  # the image at 21..36
    seqs = [engine.add_sequence() for _ in range(2)]
    try:
        cache.retain(seqs[0], text)
        cache.retain(seqs[1], with_image)
        assert cache.match(text[:30] + [0, 0]) == (seqs[0], 30)
        assert cache.match(text[:15] + [0, 0]) == (None, 0)  # less than a page shared
        assert cache.match(text + [7]) == (seqs[0], 40)
        assert cache.match(text) == (seqs[0], 39)  # the last position is always prefilled: it gives the logits
        # a prompt that has the image but ends inside it (a row of the image is last) forks where it begins
        assert cache.match(with_image[:30]) == (seqs[1], 21)
        assert cache.match(with_image[:-1] + [5, 6]) == (seqs[1], 37)
        # a kept sequence that another extends goes; past the capacity the least recently used goes
        longer = engine.add_sequence()
        cache.retain(longer, text + [1, 2, 3])
        assert list(cache.entries) == [seqs[1], longer]
        extra = [engine.add_sequence() for _ in range(2)]
        cache.retain(extra[0], [7] * 20)
        cache.retain(extra[1], [8] * 20)
        assert list(cache.entries) == [longer, extra[0], extra[1]]
        assert cache.evict(keep=longer) and list(cache.entries) == [longer, extra[1]]
    finally:
        cache.clear()
    for seq_id in [*seqs, longer, *extra]:  # every one was removed from the KV cache
        with pytest.raises(Exception, match="cannot be found in KV cache"):
            engine.remove_sequence(seq_id)
