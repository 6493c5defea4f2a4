"""The compiled CPU library against the PyTorch reference at every boundary, for both projectors (fp32).

Tolerance: 1e-4 of the reference's max magnitude (see `mobilevlm_mlc.check.verify` for why). The pixels
come from the library's own preprocessing of the image's bytes (PIL's resampler, in fixed point) and must
be bit-identical to transformers'.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mobilevlm_mlc.runtime.conversation import Conversation, tokenize_with_images
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig

from .helpers import DEMO_IMAGE, REL_TOL, built_for, rel_err

QUESTION = "What is in the image?"


def test_boundaries_match_reference(engine, reference):
    image = Image.open(DEMO_IMAGE)
    pixels, ref_pixels = engine.pixels(image), reference.pixels(image)
    assert pixels.shape == (1, 320, 480, 3) and pixels.dtype == np.uint8
    assert np.array_equal(engine.preprocess_image(pixels), ref_pixels.numpy())

    features = engine.vision_features(pixels)
    ref_features = reference.vision_features(ref_pixels)[0].numpy()
    assert features.shape == ref_features.shape == (576, 128)
    assert rel_err(features, ref_features) < REL_TOL

    embeds = engine.image_embed(pixels).numpy()
    ref_embeds = reference.image_embeds(ref_pixels).numpy()
    assert embeds.shape == ref_embeds.shape == (144, 256)
    assert rel_err(embeds, ref_embeds) < REL_TOL


def test_greedy_tokens_and_first_logits(engine, reference):
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as session:
        text = "".join(session.send(QUESTION, image, GenerationConfig(max_new_tokens=16)))
        turn = session.last
    ref_ids = reference.input_ids(Conversation().user_turn(QUESTION, with_image=True))
    assert turn.prompt_token_ids == ref_ids
    ref_embeds = reference.image_embeds(reference.pixels(image))
    ref_tokens, ref_logits = reference.greedy(reference.input_embeds(ref_ids, ref_embeds), 16)
    assert rel_err(turn.first_logits, ref_logits) < REL_TOL
    assert len(ref_tokens) == 16 and 2 not in ref_tokens  # a full 16-token run, not an early stop
    assert turn.output_token_ids == ref_tokens
    assert text == engine.tokenizer.decode(ref_tokens)


@pytest.mark.slow  # compiles
def test_prompt_longer_than_prefill_chunk(workspace, reference, projector):
    """Prefill in chunks of 150 embeddings: a ~400-token prompt spans three chunks."""
    built = built_for(workspace, projector, prefill_chunk_size=150)
    engine = Engine(built.dist, built.lib)
    assert engine.prefill_chunk_size == 150
    question = "Describe every object, colour and shape you can see, in order. " * 20
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as session:
        list(session.send(question, image, GenerationConfig(max_new_tokens=8)))
        turn = session.last
    total = len(turn.prompt_token_ids) - 1 + 144
    assert total > 2 * 150
    ref_embeds = reference.image_embeds(reference.pixels(image))
    ref_tokens, ref_logits = reference.greedy(reference.input_embeds(turn.prompt_token_ids, ref_embeds), 8)
    assert turn.prompt_token_ids == reference.input_ids(Conversation().user_turn(question, with_image=True))
    assert rel_err(turn.first_logits, ref_logits) < REL_TOL
    assert turn.output_token_ids == ref_tokens


def test_second_turn_reuses_kv_cache(engine, reference):
    image = Image.open(DEMO_IMAGE)
    follow_up = "And what colour is the roof?"
    with engine.chat() as session:
        list(session.send(QUESTION, image, GenerationConfig(max_new_tokens=6)))
        first = session.last
        list(session.send(follow_up, None, GenerationConfig(max_new_tokens=10)))
        second = session.last
    # Turn 1 stopped at max_new_tokens: its last token was never fed, so turn 2 starts with it, then
    # the template's "</s>" and the new user message (no BOS).
    assert first.finish_reason == "length"
    expected_new = [first.output_token_ids[-1], 2] + engine.tokenizer.encode(
        f"USER: {follow_up} ASSISTANT:", add_bos=False
    )
    assert second.prompt_token_ids == expected_new
    assert tokenize_with_images(engine.tokenizer, "</s>USER: x ASSISTANT:", add_bos=False)[0] == 2

    history = first.prompt_token_ids + first.output_token_ids[:-1] + second.prompt_token_ids
    ref_embeds = reference.image_embeds(reference.pixels(image))
    ref_tokens, ref_logits = reference.greedy(reference.input_embeds(history, ref_embeds), 10)
    assert rel_err(second.first_logits, ref_logits) < REL_TOL
    assert second.output_token_ids == ref_tokens


def test_sessions_are_independent(engine):
    """Two live sequences in one KV cache: the second gives what it gives alone."""
    image = Image.open(DEMO_IMAGE)
    config = GenerationConfig(max_new_tokens=5)
    with engine.chat() as alone:
        list(alone.send(QUESTION, image, config))
        expected = alone.last.output_token_ids
    with engine.chat() as busy, engine.chat() as other:
        list(busy.send("Say something long about colours.", None, GenerationConfig(max_new_tokens=3)))
        list(other.send(QUESTION, image, config))
        assert other.last.output_token_ids == expected


def test_full_kv_cache_is_a_clear_error(built):
    import pytest

    from mobilevlm_mlc.errors import MobileVLMError

    engine = Engine(built.dist, built.lib, kv_cache_tokens=256)
    capacity = engine.free_kv_tokens()  # TVM rounds up to whole pages (and keeps a spare one)
    assert 256 <= capacity < 256 + 3 * 16
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as first:
        list(first.send(QUESTION, image, GenerationConfig(max_new_tokens=2)))  # 190 prompt tokens + 1
        in_use = capacity - engine.free_kv_tokens()
        assert 190 <= in_use < 190 + 2 * 16
        with (
            engine.chat() as second,
            pytest.raises(MobileVLMError, match=r"prompt of 190 tokens does not fit the KV cache: \d+ tokens free"),
        ):
            list(second.send(QUESTION, image, GenerationConfig(max_new_tokens=2)))
    assert engine.free_kv_tokens() == capacity  # closed sessions give their pages back
    with engine.chat() as again:
        list(again.send(QUESTION, image, GenerationConfig(max_new_tokens=2)))
        assert capacity - engine.free_kv_tokens() == in_use
