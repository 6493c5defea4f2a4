"""Software prefetch for the CPU kernels: where a kernel's next reads are far from its current ones (the
next KV page, weights a few groups ahead), it asks for them while it computes."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

CACHE_LINE = 64  # bytes


def prefetch_line(address: tirx.PrimExpr) -> tirx.PrimExpr:
    """Ask for the cache line at `address` (`T.address_of(buffer[...])`), for reading, into every level."""
    return T.call_llvm_intrin(
        "void",
        "llvm.prefetch.p0",
        address,
        T.uint32(0),  # read
        T.uint32(3),  # keep in all cache levels
        T.uint32(1),  # data
    )
