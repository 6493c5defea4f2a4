"""The host half of sampling (the draw from the library's probabilities) and the settings' validation.
The library's half (`softmax_with_temperature`, the logit processors) is in `test_mlc_contract.py`; the
whole path through a built library is at the end."""

from __future__ import annotations

import numpy as np
import pytest

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.sampling import GenerationConfig, Sampler

LOGITS = np.array([0.5, 2.0, -1.0, 1.5, 0.0], np.float32)


def _probs(temperature: float) -> np.ndarray:
    e = np.exp((LOGITS - LOGITS.max()) / temperature)
    return (e / e.sum()).astype(np.float32)


def test_greedy_and_degenerate_filters_pick_the_most_likely():
    one_hot = np.eye(5, dtype=np.float32)[1]  # what softmax_with_temperature gives at temperature 0
    assert Sampler(GenerationConfig())(one_hot) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=3))(_probs(1.0)) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_p=0.01, seed=3))(_probs(1.0)) == 1


def test_seed_reproduces_and_distribution_follows_the_probabilities():
    draws = [Sampler(GenerationConfig(temperature=1.0, seed=7))(_probs(1.0)) for _ in range(3)]
    assert len(set(draws)) == 1
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=11))
    counts = np.bincount([sampler(_probs(1.0)) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, _probs(1.0), atol=0.03)
    assert sum(sampler.counts.values()) == 4000 and sampler.counts[1] == round(counts[1] * 4000)


def test_top_k_and_top_p_restrict_support():
    sampler = Sampler(GenerationConfig(temperature=5.0, top_k=2, seed=0))
    assert {sampler(_probs(5.0)) for _ in range(300)} == {1, 3}
    # probabilities at T=1: 0.46 (id 1), 0.28 (id 3), ...: top_p=0.6 keeps exactly ids 1 and 3
    sampler = Sampler(GenerationConfig(temperature=1.0, top_p=0.6, seed=0))
    assert {sampler(_probs(1.0)) for _ in range(300)} == {1, 3}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": 0}]
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(MobileVLMError):
        GenerationConfig(**kwargs)


def test_non_finite_probabilities_are_an_error():
    bad = _probs(1.0)
    bad[2] = np.nan
    with pytest.raises(MobileVLMError, match=r"the model produced non-finite logits \(NaN or Inf\): its weights"):
        Sampler(GenerationConfig())(bad)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", float("nan")),
        ("seed", -1),
        ("seed", 2**64),
        ("top_k", 1.5),
        ("max_new_tokens", True),
        ("presence_penalty", 2.5),
        ("frequency_penalty", float("nan")),
        ("repetition_penalty", 0),
        ("logit_bias", [1, 2]),
    ],
)
def test_generation_config_refuses_bad_values(field, value):
    with pytest.raises(MobileVLMError, match=f"{field} is "):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize(
    "bias,message",
    [
        ({-1: 1.0}, r"logit_bias: token id -1"),
        ({"5": 1.0}, "logit_bias: token id '5'"),
        ({5: 101}, r"logit_bias\[5\] is 101"),
    ],
)
def test_logit_bias_entries_are_checked(bias, message):
    with pytest.raises(MobileVLMError, match=message):
        GenerationConfig(logit_bias=bias)


# ---- through a built library: the processors and softmax the engine calls --------------------------


def _answer(engine, config: GenerationConfig) -> list[int]:
    with engine.chat() as session:
        list(session.send_tokens("Name three colours.", None, config))
        return session.last.output_token_ids


def test_logit_bias_steers_generation(ldpnet_engine):
    """A +100 bias makes a token certain; a -100 bias on the greedy answer's tokens removes them."""
    greedy = _answer(ldpnet_engine, GenerationConfig(max_new_tokens=6))
    forced = _answer(ldpnet_engine, GenerationConfig(max_new_tokens=4, logit_bias={777: 100.0}))
    assert forced == [777] * 4
    banned = _answer(ldpnet_engine, GenerationConfig(max_new_tokens=6, logit_bias=dict.fromkeys(greedy, -100.0)))
    assert not set(banned) & set(greedy)


def test_penalties_apply_to_generated_tokens(ldpnet_engine):
    """Penalties count only what this turn generated: a token biased to certainty is still drawn first,
    then a repetition penalty of 1000 (its logit of ~100 becomes ~0.1) keeps it out; presence and
    frequency penalties subtract (at most 2 + 2 x count here), so the bias still wins; neutral values
    change nothing."""
    bias = {777: 100.0}
    repeated = _answer(ldpnet_engine, GenerationConfig(max_new_tokens=5, logit_bias=bias, repetition_penalty=1000.0))
    assert repeated[0] == 777 and 777 not in repeated[1:]
    subtracted = GenerationConfig(max_new_tokens=5, logit_bias=bias, presence_penalty=2.0, frequency_penalty=2.0)
    assert _answer(ldpnet_engine, subtracted) == [777] * 5
    greedy = _answer(ldpnet_engine, GenerationConfig(max_new_tokens=8))
    neutral = GenerationConfig(max_new_tokens=8, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    assert _answer(ldpnet_engine, neutral) == greedy


def test_logit_bias_outside_the_vocabulary_is_refused(ldpnet_engine):
    with pytest.raises(MobileVLMError, match=r"logit_bias: token id 99999 is outside the vocabulary \[0, 32000\)"):
        _answer(ldpnet_engine, GenerationConfig(logit_bias={99999: 1.0}))
