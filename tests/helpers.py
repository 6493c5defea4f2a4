"""What the tests share: session-wide builds (one checkpoint, dist and library per projector), the
CLI run as users run it, tolerances. Tests import from here, never from one another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from mobilevlm_mlc.check.reference import ReferenceMobileVLM
from mobilevlm_mlc.check.synthetic import make_checkpoint
from mobilevlm_mlc.cli import main
from mobilevlm_mlc.compiler import compile_model
from mobilevlm_mlc.convert.converter import convert
from mobilevlm_mlc.demo import DEMO_IMAGE as DEMO_IMAGE  # the bundled picture, for the tests

PROJECTORS = ["ldpnet", "ldpnetv2"]
REL_TOL = 1e-4  # fp32 library vs the PyTorch reference, at every boundary


@dataclass
class Built:
    checkpoint: Path
    dist: Path
    lib: Path


_checkpoints: dict[str, Path] = {}
_built: dict[tuple[str, int | None], Built] = {}
_references: dict[str, ReferenceMobileVLM] = {}


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


def reference_for(workspace: Path, projector: str) -> ReferenceMobileVLM:
    if projector not in _references:
        _references[projector] = ReferenceMobileVLM(checkpoint_for(workspace, projector))
    return _references[projector]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilevlm_mlc.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def cli_error(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a CLI process: exit 2, exactly one `error:` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def error_of(capfd, *args) -> str:
    """The same from the CLI's `main` run in this process, as the console script calls it, so that
    dozens of cases do not each pay an import of TVM and torch."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own exit, after our one-line message
        code = exit_.code
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        " ".join(map(str, args)) + f" -> {code}: {err}"
    )
    return lines[0]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with `start_new_session=True` and everything it started: TVM's
    `rpc_server` serves from `popen_worker` children that outlive it when only it is terminated."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children still in the group
    except ProcessLookupError:
        pass


def write_config(folder: Path, models: dict, **overrides) -> Path:
    entries, libs = [], {}
    for i, (name, (dist, lib, model_lib)) in enumerate(models.items()):
        entries.append({"model": str(dist), "model_id": name, "model_lib": model_lib, "bundle_weight": i == 0})
        libs[model_lib] = str(lib)
    config = {"device": "android", "model_list": entries, "model_lib_path_for_prepare_libs": libs, **overrides}
    path = folder / "mlc-package-config.json"
    path.write_text(json.dumps(config))
    return path


# ---- fuzzing JSON documents: edits of a valid one's leaves (hypothesis) ----------------------------------

VALUES = st.one_of(  # any JSON value, of every type a field could wrongly hold
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(st.characters(exclude_categories=()), max_size=8),  # lone surrogates too (JSON's \ud800)
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
DELETE = object()  # an edit that removes the leaf


def leaf_paths(obj, prefix=()):
    """The path (keys and indices) of every leaf of a JSON document."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaf_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from leaf_paths(value, (*prefix, i))
    else:
        yield prefix


def apply_edit(document, path: tuple, value) -> None:
    """Set (or, for DELETE, remove) the leaf at `path`, if an earlier edit left the path in place."""
    node = document
    try:
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
