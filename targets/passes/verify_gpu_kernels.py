"""`VerifyGPUKernels`: every kernel bound to GPU threads, consistently, within the target's limits."""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx

from mobilevlm_mlc.targets.base import KernelCheckError

_BINDING = re.compile(r'^( *)for .* in T\.thread_binding\((.+), thread="(\w+\.[xyz])"\)')
_LAUNCH = re.compile(r'T\.launch_thread\("threadIdx\.[xyz]", (?:T\.int64\()?(\d+)')  # constant extents


def inconsistent_thread_extents(func: tirx.PrimFunc, script: str | None = None) -> str | None:
    """A thread axis bound with two different extents inside one kernel, or None.

    Every loop bound to e.g. threadIdx.x in one kernel must have the launch's extent; a loop with a
    larger one silently covers only part of its range (dlight's GEMV rule does this to a broadcast
    epilogue: LDP's squeeze-excitation gate, found by `check-kernels`). Pass `script` when the caller
    already printed the function (printing a big kernel is not free)."""
    kernel_indent, extents = None, {}
    for line in (script or func.script()).splitlines():
        indent = len(line) - len(line.lstrip())
        if kernel_indent is not None and line.strip() and indent <= kernel_indent:
            kernel_indent = None  # back out of the kernel's loop nest (several launches in one function)
        match = _BINDING.match(line)
        if not match:
            continue
        extent, tag = match.group(2), match.group(3)
        if tag.startswith("blockIdx") and kernel_indent is None:
            kernel_indent, extents = indent, {}  # the outermost binding of a new kernel
        if extents.setdefault(tag, extent) != extent:
            return f"{tag} bound with extents {extents[tag]} and {extent}"
    return None


def verify_gpu_kernels(target: tvm.target.Target) -> tvm.transform.Pass:
    limits = {
        "max_threads_per_block": int(target.attrs["max_num_threads"]),
        "max_shared_memory_per_block": int(target.attrs.get("max_shared_memory_per_block", 48 * 1024)),
    }

    @tvm.transform.module_pass(opt_level=0, name="VerifyGPUKernels")
    def verify(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            text = func.script()
            if "blockIdx" not in text and "threadIdx" not in text:
                raise KernelCheckError(f"kernel {gv.name_hint} is not bound to GPU threads (no schedule rule applied)")
            inconsistent = inconsistent_thread_extents(func, text)
            if inconsistent:
                raise KernelCheckError(f"kernel {gv.name_hint}: {inconsistent}")
            if "T.launch_thread(" in text:
                # TOPI's hand-written kernels (sort, scan) launch threads themselves, sized from the
                # target; TVM's verifier cannot read them, so their thread counts are checked here
                launches = [int(extent) for extent in _LAUNCH.findall(text)]
                if max(launches, default=0) > limits["max_threads_per_block"]:
                    raise KernelCheckError(f"kernel {gv.name_hint} launches {max(launches)} threads ({limits})")
            elif not s_tir.analysis.verify_gpu_code(func, limits):
                raise KernelCheckError(f"kernel {gv.name_hint} exceeds the limits of {target.kind.name} ({limits})")
        return mod

    return verify
