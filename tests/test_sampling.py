from __future__ import annotations

import numpy as np
import pytest

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.sampling import GenerationConfig, Sampler

LOGITS = np.array([0.5, 2.0, -1.0, 1.5, 0.0], np.float32)


def test_greedy_and_degenerate_filters_pick_argmax():
    assert Sampler(GenerationConfig())(LOGITS) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=3))(LOGITS) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_p=0.01, seed=3))(LOGITS) == 1


def test_seed_reproduces_and_distribution_matches_softmax():
    draws = [Sampler(GenerationConfig(temperature=1.0, seed=7))(LOGITS) for _ in range(3)]
    assert len(set(draws)) == 1
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=11))
    counts = np.bincount([sampler(LOGITS) for _ in range(4000)], minlength=5) / 4000
    expected = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    np.testing.assert_allclose(counts, expected, atol=0.03)


def test_top_k_and_top_p_restrict_support():
    sampler = Sampler(GenerationConfig(temperature=5.0, top_k=2, seed=0))
    assert {sampler(LOGITS) for _ in range(300)} == {1, 3}
    # probabilities at T=1: 0.46 (id 1), 0.28 (id 3), ...: top_p=0.6 keeps exactly ids 1 and 3
    sampler = Sampler(GenerationConfig(temperature=1.0, top_p=0.6, seed=0))
    assert {sampler(LOGITS) for _ in range(300)} == {1, 3}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": 0}]
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(MobileVLMError):
        GenerationConfig(**kwargs)


def test_a_tiny_temperature_is_greedy():
    assert Sampler(GenerationConfig(temperature=1e-300, seed=0))(LOGITS) == int(np.argmax(LOGITS))


def test_non_finite_logits_are_an_error():
    bad = LOGITS.copy()
    bad[2] = np.nan
    with pytest.raises(MobileVLMError, match=r"the model produced 1 non-finite logits \(NaN or Inf\)"):
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
    ],
)
def test_generation_config_refuses_bad_values(field, value):
    with pytest.raises(MobileVLMError, match=f"{field} is "):
        GenerationConfig(**{field: value})
