"""What a build target is: the TVM target, the Relax pipeline, and what the output file is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm


@dataclass(frozen=True)
class BuildTarget:
    name: str
    description: str
    make_target: Callable[[], tvm.target.Target]
    default_quantization: str
    pipeline: Callable[[tvm.target.Target], tvm.transform.Pass]
    library_suffix: str = ".so"  # shared library loaded with `tvm.runtime.load_module`

    def tvm_target(self) -> tvm.target.Target:
        return self.make_target()

    def relax_pipeline(self, target: tvm.target.Target) -> tvm.transform.Pass:
        with target:
            return self.pipeline(target)
