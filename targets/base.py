"""What a build target is: the TVM target, the Relax pipeline, the quantizations it takes, and what the
output file is (a shared library, or a static `.tar` system library with a symbol prefix for apps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm


class KernelCheckError(Exception):
    """A kernel the target cannot run (unscheduled, or over the target's limits); names the kernel."""


@dataclass(frozen=True)
class BuildTarget:
    name: str
    description: str
    make_target: Callable[[], tvm.target.Target]
    default_quantization: str
    quantizations: tuple[str, ...]
    pipeline: Callable[[tvm.target.Target], tvm.transform.Pass]
    codegen: str  # TVM's code generator for the device code: `target.build.<codegen>`
    system_lib: bool = False  # static `.tar` of objects registering `<prefix>` symbols (Android / iOS apps)
    provider: str = ""  # where to get a TVM with this code generator, when the installed one lacks it

    @property
    def library_suffix(self) -> str:
        return ".tar" if self.system_lib else ".so"

    def tvm_target(self) -> tvm.target.Target:
        return self.make_target()

    def relax_pipeline(self, target: tvm.target.Target) -> tvm.transform.Pass:
        with target:
            return self.pipeline(target)

    def missing_codegen(self) -> str | None:
        """Why the installed TVM cannot build this target, or None if it can."""
        if tvm.get_global_func(f"target.build.{self.codegen}", allow_missing=True) is None:
            return f"this TVM has no '{self.codegen}' code generator (target.build.{self.codegen}); {self.provider}"
        return None
