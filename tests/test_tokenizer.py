"""Our SentencePiece tokenization against transformers' slow LlamaTokenizer and MobileVLM's
`tokenizer_image_token` (as reproduced in the reference)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mobilevlm_mlc.check.reference import ReferenceMobileVLM
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.conversation import IMAGE_TOKEN_ID, Conversation, tokenize_with_images
from mobilevlm_mlc.runtime.tokenizer import StreamDecoder, Tokenizer

from .helpers import checkpoint_for

TEXTS = [
    "",
    "hello",
    " leading space",
    "\nWhat is in the image?",
    "A chat USER: ",
    "trailing spaces   ",
    "hello</s>USER: q2 ASSISTANT:",
    "a <s> b</s> c <unk> d",
    "ünïcödé 世界 🙂 \t tabs\n\nnewlines",
    "1234567890 !@#$%^&*()",
]


@pytest.fixture(scope="module")
def tokenizers(workspace):
    ckpt = checkpoint_for(workspace, "ldpnet")
    return Tokenizer(ckpt / "tokenizer.model"), AutoTokenizer.from_pretrained(str(ckpt), use_fast=False), ckpt


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_slow_tokenizer(tokenizers, text):
    ours, hf, _ = tokenizers
    assert ours.encode(text) == hf(text).input_ids
    assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids


def test_image_prompt_matches_tokenizer_image_token(tokenizers):
    ours, _, ckpt = tokenizers
    reference = ReferenceMobileVLM.__new__(ReferenceMobileVLM)  # only its tokenizer is needed here
    reference.tokenizer = tokenizers[1]
    prompts = [
        Conversation().user_turn("What is in the image?", with_image=True),
        "no image at all",
        "<image>",
        "two <image> images <image>\nend",
    ]
    for prompt in prompts:
        ids = tokenize_with_images(ours, prompt, add_bos=True)
        assert ids == reference.input_ids(prompt), prompt
    first = tokenize_with_images(ours, prompts[0], add_bos=True)
    after = first[first.index(IMAGE_TOKEN_ID) + 1 :]
    assert ours.sp.id_to_piece(after[0]) == "▁" and ours.sp.id_to_piece(after[1]) == "<0x0A>"


def test_stream_decoder_emits_whole_text(tokenizers):
    ours = tokenizers[0]
    text = "Ünïcödé 世界 🙂 done."
    ids = ours.encode(text, add_bos=False)
    stream = StreamDecoder(ours)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == ours.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", ["caf\udcff", "half a pair \ud83d here"])
def test_text_that_is_not_unicode_is_refused_by_name(tokenizers, text):
    """A lone surrogate (a JSON escape of half a pair; bytes that were not UTF-8, kept by Python as
    surrogate escapes) has no UTF-8 for SentencePiece: one error naming it, not SentencePiece's."""
    ours, _, _ = tokenizers
    with pytest.raises(MobileVLMError, match="a lone UTF-16 surrogate") as raised:
        ours.encode(text)
    assert repr(text[-1] if text.endswith("\udcff") else "\ud83d") in str(raised.value)
