"""The kernels' thread count: one per physical core unless the user says otherwise, as TVM's pool sees it."""

import os
import subprocess
import sys

import pytest

from mobilevlm_mlc.runtime.threads import physical_cores

POOL_SIZE = """
import tvm
from mobilevlm_mlc.runtime.backend import LocalBackend
from mobilevlm_mlc.runtime.threads import use_threads
said = use_threads({threads})
LocalBackend()
print(said, tvm.get_global_func("runtime.NumThreads")())
"""


def pool_size(env: dict, threads: int | None = None) -> tuple[int, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-c", POOL_SIZE.format(threads=threads)],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    said, pool = proc.stdout.split()
    return int(said), int(pool)


def test_physical_cores_counts_each_core_once():
    with open("/proc/cpuinfo") as f:
        cores = {line.split(":")[1].strip() for line in f if line.startswith("core id")}
    assert physical_cores() == min(len(cores) or len(os.sched_getaffinity(0)), len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    ("env", "threads", "expected"),
    [
        ({}, None, physical_cores()),  # TVM alone would take half the logical CPUs on x86
        ({"TVM_NUM_THREADS": "1"}, None, 1),
        ({"OMP_NUM_THREADS": "1"}, None, 1),
        ({"TVM_NUM_THREADS": "1"}, 2, 2),  # --threads wins
        ({"TVM_NUM_THREADS": "lots"}, None, physical_cores()),  # not a count: ignored
        ({"TVM_NUM_THREADS": "lots", "OMP_NUM_THREADS": "1"}, None, 1),
    ],
)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_pool_gets_what_was_asked(env, threads, expected):
    assert pool_size(env, threads) == (expected, expected)
