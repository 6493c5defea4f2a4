"""Next-token choice from float32 logits: greedy, or temperature / top-k / top-p with a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MobileVLMError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MobileVLMError(f"max_new_tokens is {self.max_new_tokens}, expected at least 1")
        if self.temperature < 0:
            raise MobileVLMError(f"temperature is {self.temperature}, expected >= 0")
        if not 0 < self.top_p <= 1:
            raise MobileVLMError(f"top_p is {self.top_p}, expected in (0, 1]")
        if self.top_k < 0:
            raise MobileVLMError(f"top_k is {self.top_k}, expected >= 0")


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        c = self.config
        if c.temperature == 0:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / c.temperature
        order = np.argsort(-scores, kind="stable")
        if c.top_k:
            order = order[: c.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if c.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), c.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
