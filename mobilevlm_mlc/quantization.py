"""Quantization schemes by MLC name. `q0*` keep full-precision weights in the model dtype."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MobileVLMError


@dataclass(frozen=True)
class Quantization:
    name: str
    model_dtype: str  # activations, norms, the vision tower, and unquantized weights


QUANTIZATIONS = {q.name: q for q in (Quantization("q0f32", "float32"), Quantization("q0f16", "float16"))}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise MobileVLMError(f"unknown quantization '{name}' (expected one of {', '.join(QUANTIZATIONS)})")
    return QUANTIZATIONS[name]
