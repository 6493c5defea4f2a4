"""How many threads the library's kernels get. TVM's pool, left to itself on x86, takes half the logical
CPUs (it assumes two hardware threads per core): on a 2-vCPU VM without SMT, or any CPU with SMT off,
every kernel then runs on one core (measured: the CLIP-shaped GEMM 71 ms on 1 thread, 40 ms on 2)."""

from __future__ import annotations

import os
from pathlib import Path

import tvm

_SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Cores this process may run on, each counted once whatever its hardware threads (Linux topology;
    elsewhere, the CPUs the process may use)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


def use_threads(threads: int | None = None) -> int:
    """Size TVM's pool (it reads TVM_NUM_THREADS when it starts, and starts here): `threads` when given,
    else what the user set in TVM_NUM_THREADS / OMP_NUM_THREADS, else one per physical core. Returns the
    pool's size (TVM caps it at the logical CPUs)."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):  # the order TVM reads them in
        value = os.environ.get(name, "").strip()
        threads = threads or (int(value) if value.isdigit() and int(value) > 0 else None)
    os.environ["TVM_NUM_THREADS"] = str(threads or physical_cores())
    return int(tvm.get_global_func("runtime.NumThreads")())
