"""Generation settings, and the host half of sampling: the draw from the library's probabilities."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.targets.passes.attach_sampling_functions import GREEDY_TEMPERATURE


@dataclass
class GenerationConfig:
    """One request's decoding settings, with OpenAI's (and MLC's) meaning and ranges."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (at or below MLC's 1e-5)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token
    repetition_penalty: float = 1.0  # a generated token's logit divided by it (multiplied, if negative)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        """Each value checked where it enters (the CLI builds this before any work)."""

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise MobileVLMError(f"max_new_tokens is {self.max_new_tokens!r}, expected an integer >= 1")
        if not number(self.temperature) or self.temperature < 0:
            raise MobileVLMError(f"temperature is {self.temperature!r}, expected a finite number >= 0")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise MobileVLMError(f"top_p is {self.top_p!r}, expected a number in (0, 1]")
        if not integer(self.top_k) or self.top_k < 0:
            raise MobileVLMError(f"top_k is {self.top_k!r}, expected an integer >= 0")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < 2**64):
            raise MobileVLMError(f"seed is {self.seed!r}, expected an integer in [0, 2^64)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not number(value) or not -2 <= value <= 2:
                raise MobileVLMError(f"{name} is {value!r}, expected a number in [-2, 2]")
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise MobileVLMError(f"repetition_penalty is {self.repetition_penalty!r}, expected a number > 0")
        if not isinstance(self.logit_bias, dict):
            raise MobileVLMError(f"logit_bias is {self.logit_bias!r}, expected a mapping of token id to bias")
        for token, bias in self.logit_bias.items():
            if not integer(token) or token < 0:
                raise MobileVLMError(f"logit_bias: token id {token!r}, expected an integer >= 0")
            if not number(bias) or not -100 <= bias <= 100:
                raise MobileVLMError(f"logit_bias[{token}] is {bias!r}, expected a number in [-100, 100]")

    @property
    def penalizes(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0, 0, 1)


class Sampler:
    """One sequence's draw from the probabilities the library's `softmax_with_temperature` gives (after
    its logit processors): greedy, or top-k / top-p with a seeded RNG, on the host as MLC's CPU sampler.
    It counts the tokens it produced, which the penalties are computed from."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.counts: Counter[int] = Counter()

    def __call__(self, probs: np.ndarray) -> int:
        token = self._draw(probs)
        self.counts[token] += 1
        return token

    def _draw(self, probs: np.ndarray) -> int:
        if not np.isfinite(probs).all():  # the library's softmax gives a row with a non-finite logit as NaN
            raise MobileVLMError(
                "the model produced non-finite logits (NaN or Inf): its weights or config (rope_theta, "
                "rms_norm_eps, a corrupted shard) are broken; generation stopped"
            )
        c = self.config
        if c.temperature <= GREEDY_TEMPERATURE:
            return int(np.argmax(probs))
        order = np.argsort(-probs, kind="stable")
        if c.top_k:
            order = order[: c.top_k]
        kept = probs[order].astype(np.float64)
        if c.top_p < 1:
            cumulative = np.cumsum(kept) / kept.sum()
            kept = kept[: int(np.searchsorted(cumulative, c.top_p)) + 1]
            order = order[: len(kept)]
        return int(order[self.rng.choice(len(order), p=kept / kept.sum())])
