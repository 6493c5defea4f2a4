"""`verify`: the compiled library against the PyTorch reference, boundary by boundary.

Parity boundaries: pixel tensor, vision features (CLIP layer `mm_vision_select_layer`, CLS dropped),
projector output, first-token logits, then N greedy tokens. For a 4-bit build the logits and tokens
are checked against the reference with the decoder's weights fake-quantized (dequantize(quantize(W))),
which isolates the kernels: only their arithmetic may differ. The error of a tensor is its max abs
difference; relative error divides it by the reference's max magnitude. Tolerances: fp32 1e-4 — the
kernels sum in another order than PyTorch, ~sqrt(K)·eps ≈ 1e-5 per reduction of length K up to ~6k,
compounding mildly over the layers (measured ~1e-6); fp16 activations 2e-2; int8 activations of
the quantized matmuls (a `cpu` NK64 build on AVX-512 VNNI, emulated by the reference) 2e-2: each
rounding to 1/127 of its group's max flips under fp32 noise now and then, and one flip moves a
random-weight model's logits by up to ~1% (a 1e-7 relative nudge of the reference's own input moves
them 0.9%), so greedy tokens past the first are not required to agree, as with fp16.

Accuracy (what quantization costs): logits against the fp32 reference over a 64-token teacher-forced
continuation (the fp32 model's own greedy tokens): cosine similarity, max abs error, top-1 agreement.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobilevlm_mlc.errors import MobileVLMError

RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 2e-2}  # by the decoder's activation precision


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
class Accuracy:
    """Logits of the build against fp32, one row per teacher-forced position."""

    positions: int
    cosine_mean: float
    cosine_min: float
    max_abs: float
    top1_agreement: float


@dataclass
class VerifyReport:
    quantization: str
    parity_reference: str
    boundaries: list[Boundary] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    reference_tokens: list[int] = field(default_factory=list)
    tokens_required: bool = True
    accuracy: Accuracy | None = None

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
        lines = [
            f"verify ({self.quantization}) against the PyTorch reference ({self.parity_reference})",
            f"{'boundary':<20}{'shape':<18}{'max abs err':>14}{'max rel err':>14}{'tolerance':>12}  result",
        ]
        for b in self.boundaries:
            lines.append(
                f"{b.name:<20}{str(list(b.shape)):<18}{b.max_abs:>14.3e}{b.max_rel:>14.3e}{b.tolerance:>12.0e}  {'ok' if b.ok else 'FAIL'}"
            )
        n = len(self.reference_tokens)
        verdict = (
            "ok"
            if self.tokens == self.reference_tokens
            else ("FAIL" if self.tokens_required else "differs (not required)")
        )
        lines.append(f"greedy tokens: {self.tokens_agree}/{n} leading tokens agree  {verdict}")
        if self.accuracy:
            a = self.accuracy
            lines.append(
                f"accuracy vs fp32 over {a.positions} teacher-forced tokens: logits cosine mean {a.cosine_mean:.6f} "
                f"(min {a.cosine_min:.6f}), max abs err {a.max_abs:.3e}, top-1 agreement {a.top1_agreement:.1%}"
            )
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def compare(name: str, ours: np.ndarray, reference: np.ndarray, tolerance: float) -> Boundary:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"{name}: shape {ours.shape} differs from the reference's {reference.shape}")
    max_abs = float(np.abs(ours - reference).max())
    return Boundary(name, ours.shape, max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12), tolerance)


def accuracy(ours: np.ndarray, fp32: np.ndarray, tokens: list[int]) -> Accuracy:
    a, b = ours.astype(np.float64), fp32.astype(np.float64)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return Accuracy(
        positions=len(tokens),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        max_abs=float(np.abs(a - b).max()),
        top1_agreement=float((a.argmax(-1) == np.asarray(tokens)).mean()),
    )


def verify(
    model_dir: Path,
    image: Path,
    prompt: str,
    tokens: int = 16,
    workdir: Path | None = None,
    quantization: str = "q0f32",
    teacher_tokens: int = 64,
    target: str = "cpu",
    cpu: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Build `model_dir` for `target` and compare it with the reference. A library of a target that runs
    here under emulation (`arm64-linux`) runs on an emulated device of its `--cpu` (`emulation`); a `cuda`
    one on this machine's GPU (the reference stays fp32 on the CPU)."""
    import tvm

    from mobilevlm_mlc.compiler import compile_model
    from mobilevlm_mlc.convert.converter import convert
    from mobilevlm_mlc.emulation import runs_on
    from mobilevlm_mlc.runtime.engine import Engine
    from mobilevlm_mlc.runtime.preprocess import load_image
    from mobilevlm_mlc.targets import get_target

    say = progress or (lambda _: None)
    build_target = get_target(target)
    if not build_target.runs_on_this_machine or build_target.device not in ("cpu", "cuda"):
        raise MobileVLMError(
            f"--target {target}: verify runs libraries that load on this machine (cpu, arm64-linux under "
            "qemu-user, cuda on its GPU); "
            + (
                "an Android system library runs only inside an app: check-kernels --target android-cpu runs its kernels here"
                if build_target.system_lib
                else "this one runs only on its device"
            )
        )
    if build_target.device == "cuda" and not tvm.cuda(0).exist:
        raise MobileVLMError(
            f"--target {target}: no CUDA GPU on this machine (TVM finds none); run it where the GPU is"
        )
    try:
        build_target.cpu(cpu)  # a bad --cpu before any work
    except ValueError as err:
        raise MobileVLMError(str(err)) from None
    model_dir = Path(model_dir)
    picture = load_image(Path(image))
    with tempfile.TemporaryDirectory(prefix="mobilevlm-verify-") as scratch:
        work = Path(workdir) if workdir else Path(scratch)
        dist = convert(model_dir, work / f"dist-{quantization}", quantization, progress=False)
        lib = work / f"lib-{quantization}-{target}{build_target.library_suffix}"
        compile_model(dist, target, lib, cpu)
        with runs_on(build_target, cpu, say) as remote:
            engine = Engine(dist, lib, device=build_target.device, remote=remote)
            return _compare_with_reference(engine, model_dir, picture, prompt, tokens, quantization, teacher_tokens)


def _compare_with_reference(
    engine, model_dir: Path, picture, prompt: str, tokens: int, quantization: str, teacher_tokens: int
) -> VerifyReport:
    from mobilevlm_mlc.runtime.conversation import Conversation
    from mobilevlm_mlc.runtime.sampling import GenerationConfig

    from .reference import ReferenceMobileVLM, reference_pixels

    scheme = engine.dist.quantization.scheme
    reference = ReferenceMobileVLM(model_dir)
    dtype = engine.dist.config.dtype
    tolerance = RELATIVE_TOLERANCE[dtype]
    activations = "int8" if engine.int8_activations else dtype
    against = (
        "fp32"
        if scheme is None
        else f"fp32, decoder fake-quantized {scheme.name}" + (", int8 activations" if engine.int8_activations else "")
    )
    report = VerifyReport(quantization, against, tokens_required=activations == "float32")

    pixels, ref_pixels = engine.pixels(picture), reference.pixels(picture)  # RGB bytes; the reference's CLIP input
    exact_pixels = reference_pixels(picture, engine.dist.config.image_processor).numpy()  # float32, before any cast
    report.boundaries.append(compare("pixels", engine.preprocess_image(pixels), exact_pixels, 0.0))  # bit-exact
    ref_features = reference.vision_features(ref_pixels)[0].numpy()
    report.boundaries.append(compare("vision features", engine.vision_features(pixels), ref_features, tolerance))
    image_embeds = engine.image_embed(pixels)
    ref_embeds = reference.image_embeds(ref_pixels)
    report.boundaries.append(compare("projector output", image_embeds.numpy(), ref_embeds.numpy(), tolerance))

    ids = reference.input_ids(Conversation().user_turn(prompt, with_image=True))
    ref_input = reference.input_embeds(ids, ref_embeds)
    if scheme is not None:  # what quantization costs, against the unquantized fp32 model
        forced, _ = reference.greedy(ref_input, teacher_tokens, eos_id=None)
        fp32_logits = reference.teacher_forced_logits(ref_input, forced)
        report.accuracy = accuracy(engine.teacher_forced_logits(ids, [image_embeds], forced), fp32_logits, forced)
        reference.fake_quantize(scheme, engine.int8_activations)
        ref_input = reference.input_embeds(ids, ref_embeds)

    with engine.chat() as session:
        list(session.send(prompt, picture, GenerationConfig(max_new_tokens=tokens)))
        turn = session.last
    if turn.prompt_token_ids != ids:
        raise ValueError("prompt token ids differ from the reference tokenizer's")
    ref_tokens, ref_logits = reference.greedy(ref_input, tokens)
    report.boundaries.append(
        compare("first-token logits", turn.first_logits, ref_logits, RELATIVE_TOLERANCE[activations])
    )
    report.tokens = turn.output_token_ids + ([2] if turn.finish_reason == "stop" else [])
    report.reference_tokens = ref_tokens
    return report
