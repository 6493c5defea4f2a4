"""`cpu`: this host, through LLVM with the host's own `mcpu` (a bare `llvm` target is generic x86-64)."""

import tvm

from .base import BuildTarget

HOST_CPU = BuildTarget(
    name="cpu",
    description="this machine's CPU (LLVM, host mcpu), shared library",
    make_target=lambda: tvm.target.Target.from_device(tvm.cpu()),
    default_quantization="q0f32",
)
