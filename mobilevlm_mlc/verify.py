"""`verify`: the compiled library against the PyTorch reference, boundary by boundary.

Boundaries: pixel tensor, vision features (CLIP layer `mm_vision_select_layer`, CLS dropped), projector
output, first-token logits, then N greedy tokens. The error of a tensor is its max abs difference;
relative error divides that by the reference's max magnitude. fp32 tolerance is 1e-4 relative: the
kernels sum in another order than PyTorch, which costs ~sqrt(K)·eps ≈ 1e-5 per reduction of length K
up to ~6k, compounding mildly over the layers (measured: ~1e-6). fp16 weights and activations get 2e-2.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


@dataclass
class Boundary:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


@dataclass
class VerifyReport:
    quantization: str
    boundaries: list[Boundary] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    reference_tokens: list[int] = field(default_factory=list)
    tokens_required: bool = True

    @property
    def tokens_agree(self) -> int:
        n = 0
        for a, b in zip(self.tokens, self.reference_tokens):
            if a != b:
                break
            n += 1
        return n

    @property
    def ok(self) -> bool:
        tokens_ok = self.tokens == self.reference_tokens or not self.tokens_required
        return all(b.ok for b in self.boundaries) and tokens_ok

    def table(self) -> str:
        lines = [f"verify ({self.quantization}) against the PyTorch fp32 reference",
                 f"{'boundary':<20}{'shape':<18}{'max abs err':>14}{'max rel err':>14}{'tolerance':>12}  result"]
        for b in self.boundaries:
            lines.append(f"{b.name:<20}{str(list(b.shape)):<18}{b.max_abs:>14.3e}{b.max_rel:>14.3e}{b.tolerance:>12.0e}  {'ok' if b.ok else 'FAIL'}")
        n = len(self.reference_tokens)
        verdict = "ok" if self.tokens == self.reference_tokens else ("FAIL" if self.tokens_required else "differs (not required)")
        lines.append(f"greedy tokens: {self.tokens_agree}/{n} leading tokens agree  {verdict}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def compare(name: str, ours: np.ndarray, reference: np.ndarray, tolerance: float) -> Boundary:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"{name}: shape {ours.shape} differs from the reference's {reference.shape}")
    max_abs = float(np.abs(ours - reference).max())
    return Boundary(name, ours.shape, max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12), tolerance)


def verify(model_dir: Path, image: Path, prompt: str, tokens: int = 16, workdir: Path | None = None, quantization: str = "q0f32") -> VerifyReport:
    from .compiler import compile_model
    from .convert import convert
    from .engine import Engine
    from .preprocess import load_image
    from .reference import ReferenceMobileVLM
    from .sampling import GenerationConfig

    model_dir = Path(model_dir)
    picture = load_image(Path(image))
    with tempfile.TemporaryDirectory(prefix="mobilevlm-verify-") as scratch:
        work = Path(workdir) if workdir else Path(scratch)
        dist = convert(model_dir, work / f"dist-{quantization}", quantization, progress=False)
        lib = work / f"lib-{quantization}-cpu.so"
        compile_model(dist, "cpu", lib)
        engine = Engine(dist, lib)
        reference = ReferenceMobileVLM(model_dir)
        dtype = engine.dist.config.dtype
        tolerance = RELATIVE_TOLERANCE[dtype]
        report = VerifyReport(quantization, tokens_required=dtype == "float32")

        pixels, ref_pixels = engine.pixels(picture), reference.pixels(picture)
        report.boundaries.append(compare("pixels", pixels, ref_pixels.numpy(), tolerance))
        ref_features = reference.vision_features(ref_pixels)[0].numpy()
        report.boundaries.append(compare("vision features", engine.vision_features(pixels), ref_features, tolerance))
        ref_embeds = reference.image_embeds(ref_pixels)
        report.boundaries.append(compare("projector output", engine.image_embed(pixels), ref_embeds.numpy(), tolerance))

        with engine.chat() as session:
            list(session.send(prompt, picture, GenerationConfig(max_new_tokens=tokens)))
            turn = session.last
        ref_ids = reference.input_ids(_first_turn_prompt(prompt))
        if ref_ids != turn.prompt_token_ids:
            raise ValueError("prompt token ids differ from the reference tokenizer's")
        ref_tokens, ref_logits = reference.greedy(reference.input_embeds(ref_ids, ref_embeds), tokens)
        report.boundaries.append(compare("first-token logits", turn.first_logits, ref_logits, tolerance))
        report.tokens = turn.output_token_ids + ([2] if turn.finish_reason == "stop" else [])
        report.reference_tokens = ref_tokens
        return report


def _first_turn_prompt(prompt: str) -> str:
    from .conversation import Conversation

    return Conversation().user_turn(prompt, with_image=True)
