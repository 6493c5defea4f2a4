"""The blob a TVM library carries in its `__tvm_ffi__library_bin` symbol: the import tree of runtime
modules (VM bytecode, device code) serialized by tvm-ffi. We read it to inspect artifacts without the
hardware, and rewrite it to replace CUDA C source with ahead-of-time compiled device code.

Layout (little-endian): u64 size of the rest; u64-array import-tree row pointers; u64-array child
indices; then per module its kind (u64-length string) and, except for the host library `_lib`, its
serialized bytes (u64-length string). A device-code module's bytes (CUDA, OpenCL) are: format string
("cuda" = CUDA C compiled at load, "fatbin"/"cubin"/"ptx" ready for `cuModuleLoadData`, "cl" OpenCL C),
the kernel table, the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


class LibraryBinError(ValueError):
    """The blob does not have the layout above."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise LibraryBinError(f"truncated: wanted {n} bytes at offset {self.pos} of {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def bytes_(self) -> bytes:
        return self.take(self.u64())

    def str_(self) -> str:
        return self.bytes_().decode("utf-8", errors="replace")

    def u64_array(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _bytes(b: bytes) -> bytes:
    return _u64(len(b)) + b


@dataclass
class LibraryBin:
    row_ptr: list[int]
    child_indices: list[int]
    modules: list[tuple[str, bytes]]  # (kind, serialized bytes; b"" for the host library "_lib")

    @classmethod
    def parse(cls, blob: bytes) -> LibraryBin:
        r = _Reader(blob)
        size = r.u64()
        if size != len(blob) - 8:
            raise LibraryBinError(f"size field says {size} bytes, blob holds {len(blob) - 8}")
        row_ptr, child_indices = r.u64_array(), r.u64_array()
        if len(row_ptr) < 2 or len(row_ptr) > 4096:
            raise LibraryBinError(f"import tree of {len(row_ptr)} row pointers")
        modules = []
        for _ in range(len(row_ptr) - 1):
            kind = r.str_()
            modules.append((kind, b"" if kind == "_lib" else r.bytes_()))
        if r.pos != len(blob):
            raise LibraryBinError(f"{len(blob) - r.pos} trailing bytes after the last module")
        return cls(row_ptr, child_indices, modules)

    def serialize(self) -> bytes:
        body = _u64(len(self.row_ptr)) + b"".join(map(_u64, self.row_ptr))
        body += _u64(len(self.child_indices)) + b"".join(map(_u64, self.child_indices))
        for kind, data in self.modules:
            body += _bytes(kind.encode()) + (b"" if kind == "_lib" else _bytes(data))
        return _u64(len(body)) + body


@dataclass
class KernelInfo:
    name: str
    arg_dtypes: list[tuple[int, int, int]]  # DLDataType (code, bits, lanes)
    launch_tags: list[str]  # blockIdx.x, threadIdx.x, ...
    extra: bytes = b""


@dataclass
class DeviceCode:
    fmt: str  # "cuda" (CUDA C, compiled when loaded), "fatbin" / "cubin" / "ptx", "cl" (OpenCL C)
    kernels: dict[str, KernelInfo] = field(default_factory=dict)
    data: bytes = b""

    @classmethod
    def parse(cls, payload: bytes) -> DeviceCode:
        r = _Reader(payload)
        fmt = r.str_()
        kernels = {}
        for _ in range(r.u64()):
            key = r.str_()
            name = r.str_()
            dtypes = [struct.unpack("<BBH", r.take(4)) for _ in range(r.u64())]
            tags = [r.str_() for _ in range(r.u64())]
            extra = r.take(4 * r.u64())  # one u32 tag per argument
            kernels[key] = KernelInfo(name, dtypes, tags, extra)
        data = r.bytes_()
        if r.pos != len(payload):
            raise LibraryBinError(f"device module: {len(payload) - r.pos} trailing bytes")
        return cls(fmt, kernels, data)

    def serialize(self) -> bytes:
        out = _bytes(self.fmt.encode()) + _u64(len(self.kernels))
        for key, k in self.kernels.items():
            out += _bytes(key.encode()) + _bytes(k.name.encode())
            out += _u64(len(k.arg_dtypes)) + b"".join(struct.pack("<BBH", *d) for d in k.arg_dtypes)
            out += _u64(len(k.launch_tags)) + b"".join(_bytes(t.encode()) for t in k.launch_tags)
            out += _u64(len(k.extra) // 4) + k.extra
        return out + _bytes(self.data)
