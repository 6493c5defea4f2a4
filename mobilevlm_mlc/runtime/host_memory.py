"""Host memory for the weights: mappings aligned to 2 MiB and advised as transparent huge pages.

A decode step reads every weight once. In 4 KiB pages that is one TLB miss per page — about 200,000 per
step for a 1.4B-parameter q4 decoder, each a page walk (two-dimensional under a hypervisor) — and the
hardware prefetchers stop at every page's end. In 2 MiB pages it is a few hundred. The advice is a
hint: where the kernel has transparent huge pages off (or the system has none) the mappings are
ordinary memory and nothing else changes. Tensors are 64-byte aligned, as TVM's own allocator makes
them, and handed to TVM without a copy (DLPack), so the mapping lives as long as the tensors do.
"""

from __future__ import annotations

import mmap

import numpy as np
import tvm

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # bytes mapped at a time: a few per model, little left unused
ALIGNMENT = 64  # TVM's kAllocAlignment: its kernels may load aligned vectors


class HugePageArena:
    """A bump allocator over anonymous mappings, for tensors that live as long as their engine."""

    def __init__(self) -> None:
        self._rest = np.empty(0, np.uint8)  # the unused tail of the newest mapping

    def tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        """A CPU tensor holding a copy of `array`, in this arena."""
        view = self._take(array.nbytes).view(array.dtype).reshape(array.shape)
        view[...] = array
        return tvm.runtime.from_dlpack(view)

    def _take(self, nbytes: int) -> np.ndarray:
        size = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        if self._rest.size < size:
            self._rest = _mapping(max(CHUNK, size))
        taken, self._rest = self._rest[:size], self._rest[size:]
        return taken[:nbytes]


def _mapping(size: int) -> np.ndarray:
    """`size` bytes of fresh anonymous memory starting on a 2 MiB boundary, advised as huge pages before
    anything touches it (so the first write faults in whole huge pages)."""
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX: private (a shared one is shmem, whose huge pages are off by default)
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        mapping = mmap.mmap(-1, size + HUGE_PAGE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mapping, np.uint8)  # keeps the mapping alive as long as any view of it
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start : start + size]
