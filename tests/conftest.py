"""Shared, session-scoped builds: random-weight checkpoints for both projectors, converted (q0f32) and
compiled for the CPU once, plus their PyTorch references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert import convert
from mobilevlm_mlc.demo import DEMO_IMAGE
from mobilevlm_mlc.engine import Engine
from mobilevlm_mlc.reference import ReferenceMobileVLM
from mobilevlm_mlc.synthetic import make_checkpoint

PROJECTORS = ["ldpnet", "ldpnetv2"]


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps a cache folder; put it in a temporary folder removed at exit, not in the tree."""
    import atexit
    import shutil
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    home = tempfile.mkdtemp(prefix="mobilevlm-hypothesis-")
    atexit.register(shutil.rmtree, home, True)
    set_hypothesis_home_dir(home)


@dataclass
class Built:
    checkpoint: Path
    dist: Path
    lib: Path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mobilevlm")


_checkpoints: dict[str, Path] = {}
_built: dict[tuple[str, int | None], Built] = {}
_references: dict[str, ReferenceMobileVLM] = {}
_engines: dict[tuple[str, int | None], Engine] = {}


def checkpoint_for(workspace: Path, projector: str) -> Path:
    if projector not in _checkpoints:
        _checkpoints[projector] = make_checkpoint(workspace / f"ckpt-{projector}", projector, seed=1)
    return _checkpoints[projector]


def built_for(workspace: Path, projector: str, prefill_chunk_size: int | None = None) -> Built:
    key = (projector, prefill_chunk_size)
    if key not in _built:
        ckpt = checkpoint_for(workspace, projector)
        name = f"{projector}-q0f32-chunk{prefill_chunk_size or 'default'}"
        dist = convert(ckpt, workspace / name, "q0f32", prefill_chunk_size=prefill_chunk_size, progress=False)
        lib = workspace / f"{name}.so"
        compile_model(dist, "cpu", lib)
        _built[key] = Built(ckpt, dist, lib)
    return _built[key]


@pytest.fixture(scope="session", params=PROJECTORS)
def projector(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def built(workspace: Path, projector: str) -> Built:
    return built_for(workspace, projector)


@pytest.fixture(scope="session")
def engine(built: Built, projector: str) -> Engine:
    key = (projector, None)
    if key not in _engines:
        _engines[key] = Engine(built.dist, built.lib)
    return _engines[key]


def reference_for(workspace: Path, projector: str) -> ReferenceMobileVLM:
    if projector not in _references:
        _references[projector] = ReferenceMobileVLM(checkpoint_for(workspace, projector))
    return _references[projector]


@pytest.fixture(scope="session")
def reference(workspace: Path, projector: str) -> ReferenceMobileVLM:
    return reference_for(workspace, projector)


@pytest.fixture(scope="session")
def ldpnet_built(workspace: Path) -> Built:
    return built_for(workspace, "ldpnet")


@pytest.fixture(scope="session")
def ldpnet_engine(ldpnet_built: Built) -> Engine:
    key = ("ldpnet", None)
    if key not in _engines:
        _engines[key] = Engine(ldpnet_built.dist, ldpnet_built.lib)
    return _engines[key]


@pytest.fixture(scope="session")
def android_models(workspace: Path) -> dict[str, tuple[Path, Path, str]]:
    """Two static libraries for MLC's Android app, built once: name -> (dist, .tar, model_lib)."""
    built = {}
    for projector, quantization, target in (("ldpnet", "q4f16_0", "android-adreno"), ("ldpnetv2", "q4f16_3", "android-cpu")):
        name = f"mobilevlm-{projector}-{quantization}"
        dist = convert(checkpoint_for(workspace, projector), workspace / "pkg" / name, quantization, progress=False)
        report = compile_model(dist, target, workspace / "pkg" / f"{name}-{target}.tar")
        built[name] = (dist, Path(report["output"]), report["system_lib_prefix"].rstrip("_"))
    return built
