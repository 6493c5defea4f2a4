"""The compiled library: refuse a file that cannot load, and look inside one without the hardware it is
for: the ELF machine of its objects, the system-lib prefix, and the import blob (`targets/toolchain/`) with the VM bytecode's `_metadata`
and each device module (OpenCL source, CUDA fatbin and the architectures inside it)."""

from __future__ import annotations

import json
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.targets.toolchain.elf import elf_machine, elf_symbols
from mobilevlm_mlc.targets.toolchain.fatbin import fatbin_entries
from mobilevlm_mlc.targets.toolchain.library_bin import DeviceCode, LibraryBin, LibraryBinError

BLOB_SYMBOL = "__tvm_ffi__library_bin"


def check_shared_library(path: Path, machine: str | None) -> None:
    """Refuse, before the dynamic loader maps it, a file that is not a whole 64-bit ELF shared object
    (for `machine`, when given): a truncated one would load and then die of SIGBUS when touched."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
        size = f.seek(0, 2)
        if head[:4] != b"\x7fELF":
            if tarfile.is_tarfile(path):
                raise MobileVLMError(
                    f"{path}: is a system library (.tar) for linking into an app, not a shared library; "
                    "compile for a target that writes a .so to run it here"
                )
            raise MobileVLMError(f"{path}: not a shared library (no ELF header); build it with `mobilevlm-mlc compile`")
        if len(head) < 64 or head[4] != 2 or head[5] != 1:
            raise MobileVLMError(f"{path}: not a 64-bit little-endian ELF file")
        found, kind = elf_machine(head), struct.unpack_from("<H", head, 16)[0]
        if kind != 3:  # ET_DYN
            raise MobileVLMError(f"{path}: an ELF file but not a shared object (type {kind})")
        if machine is not None and found != machine:
            raise MobileVLMError(
                f"{path}: built for {found}, but this machine is {machine}; "
                "run it on its device (bench --rpc-tracker) or compile for target 'cpu'"
            )
        phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
        ends = [shoff + shentsize * shnum, phoff + phentsize * phnum]
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum if len(table) == phentsize * phnum else 0):
            _, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            ends.append(offset + filesz)
        if max(ends) > size:
            raise MobileVLMError(f"{path}: truncated ({size} bytes, its ELF headers need {max(ends)}); build it again")


@dataclass
class DeviceModule:
    kind: str  # "cuda", "opencl", ...
    format: str  # "fatbin", "cuda" (source), "cl", ...
    kernels: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # fatbin contents
    source: bytes = field(default=b"", repr=False)  # OpenCL C


@dataclass
class LibraryReport:
    path: Path
    machines: list[str]
    system_lib_prefix: str | None
    metadata: dict
    device_modules: list[DeviceModule]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "machines": self.machines,
            "system_lib_prefix": self.system_lib_prefix,
            "build": self.metadata.get("build", {}),
            "quantization": self.metadata.get("quantization"),
            "device_modules": [
                {"kind": m.kind, "format": m.format, "kernels": m.kernels, "images": m.images}
                for m in self.device_modules
            ],
        }


def _objects(path: Path) -> list[bytes]:
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and m.name.endswith(".o")]
    return [path.read_bytes()]


def _metadata(vm_payload: bytes) -> dict:
    start = vm_payload.find(b'{"model_type"')
    if start < 0:
        raise MobileVLMError("the VM bytecode holds no _metadata")
    return json.JSONDecoder().raw_decode(vm_payload[start:].decode("utf-8", errors="replace"))[0]


def _device_module(kind: str, payload: bytes) -> DeviceModule:
    module = DeviceCode.parse(payload)
    images = fatbin_entries(module.data) if module.fmt == "fatbin" else []
    return DeviceModule(kind, module.fmt, sorted(module.kernels), images, module.data if module.fmt == "cl" else b"")


def inspect_library(path: Path) -> LibraryReport:
    """Read a `.so` or system-lib `.tar` built by `compile`; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise MobileVLMError(f"{path}: no such library")
    try:
        objects = _objects(path)
        machines = sorted({elf_machine(o) for o in objects})
        found = [(name, blob) for o in objects for name, blob in elf_symbols(o).items() if name.endswith(BLOB_SYMBOL)]
        if len(found) != 1:
            raise MobileVLMError(f"expected one '*{BLOB_SYMBOL}' symbol, found {len(found)}")
        name, raw = found[0]
        blob = LibraryBin.parse(raw)
        meta = next((_metadata(p) for k, p in blob.modules if k == "relax.VMExecutable"), {})
        devices = [_device_module(k, p) for k, p in blob.modules if k not in ("_lib", "relax.VMExecutable")]
    except (MobileVLMError, LibraryBinError, struct.error, tarfile.TarError, ValueError) as err:
        raise MobileVLMError(f"{path}: not a library built by mobilevlm-mlc compile ({err})") from None
    prefix = name[: -len(BLOB_SYMBOL)] or None
    return LibraryReport(path, machines, prefix, meta, devices)
