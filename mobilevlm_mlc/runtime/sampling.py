"""Next-token choice from float32 logits: greedy, or temperature / top-k / top-p with a seeded RNG."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mobilevlm_mlc.errors import MobileVLMError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None

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


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            bad = int(np.count_nonzero(~np.isfinite(logits)))
            raise MobileVLMError(
                f"the model produced {bad} non-finite logits (NaN or Inf) of {logits.size}: its weights or "
                "config (rope_theta, rms_norm_eps, a corrupted shard) are broken; generation stopped"
            )
        c = self.config
        if c.temperature == 0:
            return int(np.argmax(logits))
        with np.errstate(over="ignore"):  # a tiny temperature sends the others to -inf: probability 0
            scores = (logits.astype(np.float64) - float(logits.max())) / c.temperature
        order = np.argsort(-scores, kind="stable")
        if c.top_k:
            order = order[: c.top_k]
        probs = np.exp(scores[order])
        probs /= probs.sum()
        if c.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), c.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
