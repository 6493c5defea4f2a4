"""What a build target is: the TVM target, the Relax pipeline, and what the output file is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm import relax


@dataclass(frozen=True)
class BuildTarget:
    name: str
    description: str
    make_target: Callable[[], tvm.target.Target]
    default_quantization: str
    library_suffix: str = ".so"  # shared library loaded with `tvm.runtime.load_module`
    pre_passes: Callable[[], list[tvm.transform.Pass]] = field(default=lambda: [relax.transform.FuseTransposeMatmul()])

    def tvm_target(self) -> tvm.target.Target:
        return self.make_target()

    def relax_pipeline(self, target: tvm.target.Target) -> tvm.transform.Pass:
        """Our passes first (e.g. fold `x @ W.T` into one matmul so W^T is never materialized), then TVM's."""
        return tvm.transform.Sequential([*self.pre_passes(), relax.get_default_pipeline(target)])
