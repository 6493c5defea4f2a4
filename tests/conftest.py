"""Shared, session-scoped builds: random-weight checkpoints for both projectors, converted (q0f32) and
compiled for the CPU once, plus their PyTorch references."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilevlm_mlc.check.reference import ReferenceMobileVLM
from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.runtime.engine import Engine

from .helpers import PROJECTORS, Built, built_for, checkpoint_for, reference_for

_engines: dict[tuple[str, int | None], Engine] = {}  # one engine per session build


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps a cache folder; put it in a temporary folder removed at exit, not in the tree."""
    import atexit
    import shutil
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    home = tempfile.mkdtemp(prefix="mobilevlm-hypothesis-")
    atexit.register(shutil.rmtree, home, True)
    set_hypothesis_home_dir(home)


# Fixtures that compile a library (or start servers that load one): a test using any of them is `slow`,
# outside the fast tier (`make test-fast`). Tests that compile by themselves carry the mark explicitly.
BUILDING_FIXTURES = {
    "built",
    "engine",
    "ldpnet_built",
    "ldpnet_engine",
    "android_models",
    "android_libraries",
    "dists",
    "q4_builds",
    "odd_builds",
    "small_window",
    "rpc_tracker",
    "gpu_check",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BUILDING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mobilevlm")


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
def android_libraries(workspace: Path) -> dict[str, tuple[Path, Path, str]]:
    """Static libraries for Android, built once: name -> (dist, .tar, model_lib); two OpenCL ones (what
    MLC's app runs) and one for the Arm CPU."""
    built = {}
    for projector, quantization, target in (
        ("ldpnet", "q4f16_0", "android-adreno"),
        ("ldpnetv2", "q4f16_1", "android-adreno"),
        ("ldpnetv2", "q4f16_3", "android-cpu"),
    ):
        name = f"mobilevlm-{projector}-{quantization}"
        dist = convert(checkpoint_for(workspace, projector), workspace / "pkg" / name, quantization, progress=False)
        report = compile_model(dist, target, workspace / "pkg" / f"{name}-{target}.tar")
        built[name] = (dist, Path(report["output"]), report["system_lib_prefix"].rstrip("_"))
    return built


@pytest.fixture(scope="session")
def android_models(android_libraries) -> dict[str, tuple[Path, Path, str]]:
    """The two OpenCL libraries, which the packaging tests bundle for MLC's app."""
    return {name: built for name, built in android_libraries.items() if "q4f16_3" not in name}
