"""4-bit group quantization: packing bit for bit against an independent reference of MLC's scheme,
kernels against the reference with the same (fake-quantized) weights, and what q4 costs against fp32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from PIL import Image

from mobilevlm_mlc import compiler
from mobilevlm_mlc.bench.benchmark import cpu_features
from mobilevlm_mlc.check.kernel_check import scheduled_kernels
from mobilevlm_mlc.check.reference import ReferenceMobileVLM
from mobilevlm_mlc.check.synthetic import make_checkpoint
from mobilevlm_mlc.check.verify import RELATIVE_TOLERANCE
from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert, stored_params
from mobilevlm_mlc.convert.packing import dequantize_weight, quantize_weight
from mobilevlm_mlc.model_defs.quantization import DEQUANTIZE_BLOCK, QUANTIZATIONS, QUANTIZED_MATMUL
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig
from mobilevlm_mlc.targets import get_target
from mobilevlm_mlc.targets.cpu_kernels.int8_dot import int8_dot

from .helpers import DEMO_IMAGE, checkpoint_for

Q4 = ["q4f16_1", "q4f32_1", "q4f16_0", "q4f32_3", "q4f16_3"]


def mlc_reference_pack(w: np.ndarray, scale_dtype: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """MLC's scheme written out element by element (slow, obvious): ceil(k / 32) groups, the inputs
    past k read as zeros."""
    n, k = w.shape
    groups = -(-k // 32)
    q_weight = np.zeros((n, groups * 4), np.uint32)
    q_scale = np.zeros((n, groups), scale_dtype)
    for row in range(n):
        for group in range(groups):
            values = [float(w[row, c]) if c < k else 0.0 for c in range(group * 32, (group + 1) * 32)]
            scale = np.array(max(abs(v) for v in values) / 7, np.float32).astype(scale_dtype)
            q_scale[row, group] = scale
            for j, v in enumerate(values):
                col = group * 32 + j
                q = 7 if float(scale) == 0 else min(max(round(v / float(np.float32(scale)) + 7), 0), 14)
                q_weight[row, col // 8] |= np.uint32(q) << np.uint32(4 * (col % 8))
    if layout == "KN":
        return q_weight.T.copy(), q_scale.T.copy()
    if layout == "NK64":  # word j of rows 64t..64t+63 side by side
        tiled_weight = np.zeros((n // 64, k // 8, 64), np.uint32)
        tiled_scale = np.zeros((n // 64, k // 32, 64), scale_dtype)
        for row in range(n):
            tiled_weight[row // 64, :, row % 64] = q_weight[row]
            tiled_scale[row // 64, :, row % 64] = q_scale[row]
        return tiled_weight, tiled_scale
    return q_weight, q_scale


def as_nk(weight: np.ndarray, scale: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Stored (q_weight, q_scale) of any layout back to NK: [out, in/8], [out, in/32]."""
    if layout == "KN":
        return weight.T, scale.T
    if layout == "NK64":
        return (a.transpose(0, 2, 1).reshape(-1, a.shape[1]) for a in (weight, scale))
    return weight, scale


@pytest.mark.parametrize("name", Q4)
def test_packing_is_bit_exact(name):
    scheme = QUANTIZATIONS[name].scheme
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    w[3, 32:64] = 0.0  # an all-zero group
    w[5, 7] = 40.0  # an outlier that owns its group's scale
    w[6, :32] = np.linspace(-1, 1, 32)  # exact halves land on round-half-even
    q_weight, q_scale = quantize_weight(w, scheme)
    ref_weight, ref_scale = mlc_reference_pack(w, scheme.model_dtype, scheme.layout)
    assert q_weight.dtype == np.uint32 and q_scale.dtype == np.dtype(scheme.model_dtype)
    assert q_weight.shape == {"NK": (64, 12), "KN": (12, 64), "NK64": (1, 12, 64)}[scheme.layout]
    assert np.array_equal(q_weight, ref_weight)
    assert np.array_equal(q_scale, ref_scale)
    # dequantize: (q - 7) * scale, q read back nibble by nibble
    nk_weight, nk_scale = as_nk(ref_weight, ref_scale, scheme.layout)
    nk_scale = nk_scale.astype(np.float32)
    nibbles = np.array([[(int(nk_weight[r, c // 8]) >> (4 * (c % 8))) & 15 for c in range(96)] for r in range(64)])
    expected = (nibbles - 7) * np.repeat(nk_scale, 32, axis=1)
    assert np.array_equal(dequantize_weight(q_weight, q_scale, scheme), expected.astype(np.float32))
    assert np.all(dequantize_weight(q_weight, q_scale, scheme)[3, 32:64] == 0)
    assert np.abs(dequantize_weight(q_weight, q_scale, scheme) - w).max() <= 40 / 7 / 2 * 1.01


@pytest.mark.parametrize("name", ["q4f16_1", "q4f32_1", "q4f16_0"])
def test_any_input_size_packs_with_a_padded_last_group(name):
    """K = 77 (not a multiple of 32): three groups, the last zero-padded as MLC's; bit-exact, and the
    padded nibbles are the zero code 7, so they add nothing to any dot product."""
    scheme = QUANTIZATIONS[name].scheme
    w = np.random.default_rng(1).standard_normal((70, 77)).astype(np.float32)
    q_weight, q_scale = quantize_weight(w, scheme)
    ref_weight, ref_scale = mlc_reference_pack(w, scheme.model_dtype, scheme.layout)
    assert (
        q_weight.shape == {"NK": (70, 12), "KN": (12, 70)}[scheme.layout]
        and scheme.weight_shapes(70, 77)[0] == q_weight.shape
    )
    assert np.array_equal(q_weight, ref_weight) and np.array_equal(q_scale, ref_scale)
    nk_weight, nk_scale = as_nk(q_weight, q_scale, scheme.layout)
    assert all((int(nk_weight[r, 77 // 8]) >> (4 * c)) & 15 == 7 for r in range(70) for c in range(77 % 8, 8))
    restored = dequantize_weight(q_weight, q_scale, scheme, in_features=77)
    half_step = np.repeat(nk_scale.astype(np.float32), 32, axis=1)[:, :77] / 2
    assert restored.shape == (70, 77) and np.all(np.abs(restored - w) <= half_step * 1.001)


def test_nk64_falls_back_where_it_cannot_tile():
    scheme = QUANTIZATIONS["q4f16_3"].scheme
    assert scheme.for_shape(128, 64) is scheme
    assert scheme.for_shape(688, 320).layout == "NK" and scheme.for_shape(320, 344).layout == "NK"
    assert scheme.for_shape(688, 320).weight_shapes(688, 320) == ((688, 40), (688, 10))


@pytest.fixture(scope="module")
def odd_builds(workspace):
    """The `tiny-odd` model (intermediate size 344), q4f32_3 for this CPU: its attention and lm_head keep
    NK64 (int8 activations on VNNI), its MLP falls back to NK with a padded last group — both kernel
    paths on one model (the NK and KN packings of odd sizes are checked bit for bit above)."""
    ckpt = make_checkpoint(workspace / "ckpt-odd", "ldpnet", size="tiny-odd", seed=2)
    builds = {}
    for name in ("q4f32_3",):
        dist = convert(ckpt, workspace / f"odd-{name}", name, progress=False)
        compile_model(dist, "cpu", workspace / f"odd-{name}.so")
        builds[name] = Engine(dist, workspace / f"odd-{name}.so")
    return ckpt, builds


@pytest.mark.parametrize("name", ["q4f32_3"])
def test_odd_layer_sizes_quantize_and_match_the_reference(odd_builds, name):
    """A layer size no group divides converts, compiles and matches PyTorch on the same fake-quantized
    weights; NK64's MLP linears fall back to NK, recorded in the build, and keep fp activations."""
    ckpt, builds = odd_builds
    engine = builds[name]
    params = {p["name"]: p["shape"] for p in engine.metadata["params"]}
    assert params["model.layers.0.mlp.down_proj.q_weight"] == [320, 44]  # 344 inputs: 11 groups, the last padded
    assert params["model.layers.0.mlp.down_proj.q_scale"] == [320, 11]
    if name == "q4f32_3":
        assert params["model.layers.0.self_attn.qkv_proj.q_weight"] == [15, 40, 64]  # 960 rows tile: NK64 kept
        assert params["model.layers.0.mlp.gate_up_proj.q_weight"] == [688, 40]
        assert engine.metadata["build"]["layout_fallbacks"] == {
            "model.layers.*.mlp.gate_up_proj": "NK: 688 output rows are not a multiple of 64",
            "model.layers.*.mlp.down_proj": "NK: 344 inputs are not a multiple of the group size 32",
        }
    else:
        assert "layout_fallbacks" not in engine.metadata["build"]
    reference = ReferenceMobileVLM(ckpt)
    reference.fake_quantize(QUANTIZATIONS[name].scheme, engine.int8_activations)
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as session:
        list(session.send("What is in the image?", image, GenerationConfig(max_new_tokens=8)))
        turn = session.last
    tokens, logits = reference.greedy(
        reference.input_embeds(turn.prompt_token_ids, reference.image_embeds(reference.pixels(image))), 8
    )
    activations = "int8" if engine.int8_activations else QUANTIZATIONS[name].model_dtype
    assert np.abs(turn.first_logits - logits).max() < RELATIVE_TOLERANCE[activations] * np.abs(logits).max()
    assert turn.output_token_ids[0] == tokens[0]


def test_stored_parameters_follow_mlc_names(workspace):
    config = load_dist_config(workspace)
    params = stored_params(config, QUANTIZATIONS["q4f16_1"])
    assert params["model.layers.0.self_attn.qkv_proj.q_weight"] == ((768, 32), "uint32")
    assert params["model.layers.0.self_attn.qkv_proj.q_scale"] == ((768, 8), "float16")
    assert params["model.embed_tokens.q_weight"] == ((32000, 32), "uint32")
    assert params["lm_head.q_scale"] == ((32000, 8), "float16")
    assert params["model.layers.0.input_layernorm.weight"] == ((256,), "float16")
    assert params["vision_tower.encoder.layers.0.mlp.fc1.weight"] == ((512, 128), "float16")  # CLIP not quantized
    assert params["mm_projector.mlp.fc1.weight"] == ((256, 128), "float16")  # projector not quantized
    kn = stored_params(config, QUANTIZATIONS["q4f16_0"])
    assert kn["model.layers.0.mlp.down_proj.q_weight"] == ((704 // 8, 256), "uint32")
    assert kn["model.embed_tokens.q_weight"] == ((32000, 32), "uint32")  # embeddings stay row-major
    assert not any(
        name.endswith(".weight") and "layers" in name and "proj" in name and not name.startswith("vision")
        for name in params
    )


def load_dist_config(workspace):
    from mobilevlm_mlc.convert.checkpoint import load_config

    return load_config(checkpoint_for(workspace, "ldpnet"))


@pytest.fixture(scope="module")
def q4_builds(workspace):
    ckpt = checkpoint_for(workspace, "ldpnet")
    builds = {}
    for name in [*Q4, "q0f16"]:
        dist = convert(ckpt, workspace / f"ldpnet-{name}", name, progress=False)
        lib = workspace / f"ldpnet-{name}.so"
        compile_model(dist, "cpu", lib)
        builds[name] = Engine(dist, lib)
    return builds


@pytest.mark.parametrize("name", Q4)
def test_q4_kernels_match_fake_quantized_reference(q4_builds, workspace, name):
    """Same weights on both sides (dequantize(quantize(W)) in PyTorch): only kernel arithmetic differs.
    Tolerance by activation precision (see mobilevlm_mlc/verify.py): 1e-4 relative for fp32, 2e-2 for
    fp16 and for int8 matmul activations (emulated by the reference; their roundings flip under fp32
    noise, so only the first token must agree)."""
    _check_against_fake_quantized(q4_builds[name], workspace, name)


# the `cpu` build for an x86 CPU of each narrower level (this host runs their code where it has the ISA)
NARROWER_X86 = {"avx-vnni": ("alderlake", "avx_vnni"), "avx2": ("haswell", "avx2")}


@pytest.mark.parametrize("dot", list(NARROWER_X86))
def test_narrower_x86_builds_match_the_reference(workspace, monkeypatch, dot):
    """The whole model built as for an Alder Lake (AVX-VNNI) or a Haswell / Zen 3 (AVX2): int8 matmuls on
    that dot product and fp32 kernels tiled for 16 ymm registers, run here against the same reference."""
    mcpu, flag = NARROWER_X86[dot]
    if flag not in cpu_features():
        pytest.skip(f"this CPU has no {flag} to run a {mcpu} build")
    cpu = get_target("cpu")
    narrower = dataclasses.replace(
        cpu, make_target=lambda: tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": mcpu})
    )
    monkeypatch.setattr(compiler, "get_target", lambda name: narrower if name == "cpu" else get_target(name))
    dist = convert(checkpoint_for(workspace, "ldpnet"), workspace / f"ldpnet-q4f16_3-{dot}", "q4f16_3", progress=False)
    lib = workspace / f"ldpnet-q4f16_3-{dot}.so"
    compile_model(dist, "cpu", lib)
    engine = Engine(dist, lib)
    assert engine.metadata["build"]["int8_dot_product"] == dot and engine.int8_activations
    _check_against_fake_quantized(engine, workspace, "q4f16_3")


def _check_against_fake_quantized(engine: Engine, workspace, name: str) -> None:
    reference = ReferenceMobileVLM(checkpoint_for(workspace, "ldpnet"))
    reference.fake_quantize(QUANTIZATIONS[name].scheme, engine.int8_activations)
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as session:
        list(session.send("What is in the image?", image, GenerationConfig(max_new_tokens=16)))
        turn = session.last
    ref_input = reference.input_embeds(turn.prompt_token_ids, reference.image_embeds(reference.pixels(image)))
    tokens, logits = reference.greedy(ref_input, 16)
    activations = "int8" if engine.int8_activations else QUANTIZATIONS[name].model_dtype
    assert np.abs(turn.first_logits - logits).max() < RELATIVE_TOLERANCE[activations] * np.abs(logits).max()
    if activations == "float32":
        assert turn.output_token_ids == tokens
    else:  # fp16 or int8 activations against fp32 ones: thin margins may flip later tokens
        assert turn.output_token_ids[0] == tokens[0]


def test_q4_against_fp32(q4_builds, ldpnet_engine):
    """What 4 bits cost on the random-weight default model (its logit margins are thin, unlike a
    trained model's): the first greedy token agrees with fp32 and the logits stay aligned (cos > 0.95)."""
    image = Image.open(DEMO_IMAGE)
    with ldpnet_engine.chat() as session:
        list(session.send("What is in the image?", image, GenerationConfig(max_new_tokens=4)))
        fp32 = session.last
    for name in Q4:
        engine = q4_builds[name]
        with engine.chat() as session:
            list(session.send("What is in the image?", image, GenerationConfig(max_new_tokens=4)))
            q4 = session.last
        a, b = q4.first_logits.astype(np.float64), fp32.first_logits.astype(np.float64)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95, name
        assert q4.output_token_ids[0] == fp32.output_token_ids[0], name


@pytest.mark.parametrize("name", ["q4f16_1", "q4f32_3"])
def test_dequantized_weights_are_never_materialized(q4_builds, name):
    """Every CPU quantized matmul unpacks int4 inside its reduction (decode on NK64) or into a tile of
    its own thread's columns inside the parallel loop (prefill): never the whole weight in fp."""
    dist = q4_builds[name].dist
    _, lowered = scheduled_kernels(dist.config, dist.quantization.scheme, get_target("cpu"))  # compile's lowering
    quantized = {
        gv.name_hint: f
        for gv, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and QUANTIZED_MATMUL in gv.name_hint
    }
    assert quantized
    inlined = 0
    for fname, func in quantized.items():
        lines = func.script().splitlines()
        stage = [i for i, line in enumerate(lines) if f'T.sblock("{DEQUANTIZE_BLOCK}' in line]
        inlined += not stage
        for i in stage:  # nearest enclosing loop nest starts with the parallel task loop
            depth = len(lines[i]) - len(lines[i].lstrip())
            parallel = [
                j for j in range(i) if "T.parallel(" in lines[j] and len(lines[j]) - len(lines[j].lstrip()) < depth
            ]
            assert parallel, f"{fname}: dequantize outside the parallel loop"
    if name == "q4f32_3":  # decode GEMVs read the packed words directly
        assert inlined >= 4
    if q4_builds[name].int8_activations:  # every quantized matmul (prefill, decode, logits) on int8 dot products
        dot = int8_dot(tvm.target.Target.from_device(tvm.cpu()))
        int8 = {fname for fname, func in quantized.items() if dot.intrinsic in func.script()}
        # 4 prefill GEMMs, 4 decode GEMVs, lm_head's GEMV (one row) and GEMM (batch_prefill / batch_decode rows)
        assert int8 == set(quantized) and len(int8) == 10


# (LLVM triple, mcpu) -> (q4f16_3 record, q4f32_1 record): what each CPU class this project meets can do.
# An int8 dot product (AVX-512 VNNI, AVX-VNNI, AVX2, Arm dotprod) gives int8 activations to the NK64
# schemes only; fp16 arithmetic (AVX512-FP16, Arm fullfp16) keeps an fp16 vision tower in fp16.
NO_INT8 = ("model dtype", None)
ARITHMETIC = {
    ("x86_64-linux-gnu", "sapphirerapids"): (("int8", "avx512-vnni", "float16"), (*NO_INT8, "float32")),
    ("x86_64-linux-gnu", "znver4"): (("int8", "avx512-vnni", "float32"), (*NO_INT8, "float32")),
    ("x86_64-linux-gnu", "alderlake"): (("int8", "avx-vnni", "float32"), (*NO_INT8, "float32")),
    ("x86_64-linux-gnu", "znver3"): (("int8", "avx2", "float32"), (*NO_INT8, "float32")),
    ("x86_64-linux-gnu", "x86-64"): ((*NO_INT8, "float32"), (*NO_INT8, "float32")),
    ("aarch64-linux-android", "cortex-a78"): (("int8", "neon-dotprod", "float16"), (*NO_INT8, "float32")),
    ("aarch64-linux-gnu", "neoverse-n1"): (("int8", "neon-dotprod", "float16"), (*NO_INT8, "float32")),
    ("aarch64-linux-gnu", "cortex-a72"): ((*NO_INT8, "float32"), (*NO_INT8, "float32")),  # Armv8.0
}


@pytest.mark.parametrize("triple,mcpu", list(ARITHMETIC))
def test_cpu_build_records_its_arithmetic(triple, mcpu):
    """The build record `compile` writes, for CPUs of known features."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})
    for name, expected in zip(("q4f16_3", "q4f32_1"), ARITHMETIC[triple, mcpu]):
        q = QUANTIZATIONS[name]
        record = get_target("cpu").build_info(target, q.model_dtype, q.scheme)
        keys = ("quantized_matmul_activations", "int8_dot_product", "vision_compute_dtype")
        assert tuple(record[key] for key in keys) == expected, name


def test_host_libraries_record_what_they_run(q4_builds):
    """The engine takes int8 activations from the record; the NK64 builds of a host with an int8 dot product (AVX2 or better) have them, the rest not."""
    int8 = {name for name, engine in q4_builds.items() if engine.int8_activations}
    assert int8 in (set(), {"q4f16_3", "q4f32_3"})


def test_tall_matrices_are_packed_in_bounded_steps_identically():
    """Embedding / lm_head tables are quantized a block of rows at a time; blocks must not show."""
    scheme = QUANTIZATIONS["q4f16_1"].scheme
    w = np.random.default_rng(1).standard_normal((4100, 32)).astype(np.float32)
    q_weight, q_scale = quantize_weight(w, scheme)
    ref_weight, ref_scale = mlc_reference_pack(w, "float16", "NK")
    assert np.array_equal(q_weight, ref_weight) and np.array_equal(q_scale, ref_scale)


def test_fp16_vision_tower_computes_in_fp32_without_fp16_arithmetic(q4_builds, workspace):
    """On a CPU without fp16 arithmetic the vision path of an fp16 build widens its fp16 weights and
    computes in fp32 from its fp32 pixels: it matches PyTorch computing in fp32 from the same fp16-rounded
    weights up to the rounding of its fp16 result (2^-11 = 4.9e-4), inside what fp16 arithmetic costs
    (PyTorch in fp16, which accumulates in fp32: 1.5e-3)."""
    import torch

    engine = q4_builds["q0f16"]
    if engine.metadata["build"]["vision_compute_dtype"] != "float32":
        pytest.skip("this CPU has fp16 arithmetic: the vision tower computes in fp16")
    reference = ReferenceMobileVLM(checkpoint_for(workspace, "ldpnet"))
    for module in (reference.vision, reference.projector):
        module.half().float()  # the dist's fp16 weights, computed in fp32
    pixels = engine.pixels(Image.open(DEMO_IMAGE))
    with torch.no_grad():
        ref_pixels = torch.from_numpy(engine.preprocess_image(pixels))  # float32: never rounded to fp16 here
        features, embeds = reference.vision_features(ref_pixels)[0].numpy(), reference.image_embeds(ref_pixels).numpy()
        half = ReferenceMobileVLM(checkpoint_for(workspace, "ldpnet"), dtype=torch.float16)
        half_embeds = half.image_embeds(ref_pixels.half()).float().numpy()
    for got, expected in ((engine.vision_features(pixels), features), (engine.image_embed(pixels).numpy(), embeds)):
        assert got.dtype == np.float16
        assert (
            np.abs(got.astype(np.float32) - expected).max() <= 6e-4 * np.abs(expected).max()
        )  # measured 2.5e-4, 3.9e-4
    assert np.abs(half_embeds - embeds).max() > 1e-3 * np.abs(embeds).max()  # what fp16 arithmetic costs: 1.5e-3


def test_q0f16_matches_fp32_reference(q4_builds, workspace):
    engine = q4_builds["q0f16"]
    reference = ReferenceMobileVLM(checkpoint_for(workspace, "ldpnet"))
    image = Image.open(DEMO_IMAGE)
    with engine.chat() as session:
        list(session.send("What is in the image?", image, GenerationConfig(max_new_tokens=8)))
        turn = session.last
    tokens, logits = reference.greedy(
        reference.input_embeds(turn.prompt_token_ids, reference.image_embeds(reference.pixels(image))), 8
    )
    assert np.abs(turn.first_logits - logits).max() < 2e-2 * np.abs(logits).max()
    assert turn.output_token_ids == tokens
