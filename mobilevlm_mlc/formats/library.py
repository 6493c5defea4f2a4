"""The compiled library: refuse a file that cannot load, and look inside one without the hardware it is
for: the ELF machine of its objects, the system-lib prefix, and the import blob (`targets/toolchain/`) with the VM bytecode's `_metadata`
and each device module (OpenCL source, CUDA fatbin and the architectures inside it)."""

from __future__ import annotations

import json
import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.targets.toolchain.cuda_images import (
    CudaImage,
    CudaImageError,
    device_images,
    oldest_driver,
    release_of,
)
from mobilevlm_mlc.targets.toolchain.elf import elf_machine, elf_symbols
from mobilevlm_mlc.targets.toolchain.library_bin import DeviceCode, LibraryBin, LibraryBinError

from .mlc_contract import MLC_LLM_COMMIT, check_contract
from .mlc_runtime import TVM_COMMIT, runtime_problems, vm_format

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
    images: list[CudaImage] = field(default_factory=list)  # a CUDA fatbin's or cubin's SASS and PTX
    source: bytes = field(default=b"", repr=False)  # OpenCL C


@dataclass
class LibraryReport:
    path: Path
    machines: list[str]
    system_lib_prefix: str | None
    metadata: dict
    device_modules: list[DeviceModule]
    vm_functions: dict[str, int] = field(default_factory=dict)  # Relax VM function -> its arguments
    host_functions: set[str] = field(default_factory=set)  # compiled TIR functions (host side)
    # global functions the VM calls (vm.builtin.*, ...) -> the argument counts it passes them
    runtime_calls: dict[str, set[int]] = field(default_factory=dict)
    vm_header: tuple[int, str] = (0, "")  # the VM bytecode's magic and format version

    @property
    def oldest_cuda_driver(self) -> str | None:
        """The oldest CUDA release whose driver loads the device code (None: no CUDA images); the build
        record's toolkit stands in for cubins that do not name theirs."""
        toolkit = self.metadata.get("build", {}).get("cuda_toolkit")
        images = [i for m in self.device_modules for i in m.images]
        return oldest_driver(images, toolkit and release_of(toolkit))

    @property
    def runtime_functions(self) -> list[str]:
        return sorted(self.runtime_calls)

    @property
    def contract_problems(self) -> list[str]:
        """What MLC's engine would miss in this library (`mlc_contract`)."""
        return check_contract(
            self.vm_functions, self.host_functions, self.metadata, {m.kind for m in self.device_modules}
        )

    @property
    def runtime_problems(self) -> list[str]:
        """What the TVM runtime inside MLC's Android app would lack or refuse (`mlc_runtime`)."""
        return runtime_problems(self.runtime_calls, self.vm_header)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "machines": self.machines,
            "system_lib_prefix": self.system_lib_prefix,
            "build": self.metadata.get("build", {}),
            "quantization": self.metadata.get("quantization"),
            "device_modules": [
                {
                    "kind": m.kind,
                    "format": m.format,
                    "kernels": m.kernels,
                    "images": [{"kind": i.kind, "arch": i.arch, "cuda": i.cuda} for i in m.images],
                }
                for m in self.device_modules
            ],
            "oldest_cuda_driver": self.oldest_cuda_driver,
            "vm_functions": self.vm_functions,
            "runtime_functions": self.runtime_functions,
            "mlc_contract": {"mlc_llm_commit": MLC_LLM_COMMIT, "missing": self.contract_problems},
            "mlc4j_runtime": {"tvm_commit": TVM_COMMIT, "problems": self.runtime_problems},
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


_VM_FUNCTION = re.compile(r'^with ib\.function\("([^"]+)", num_inputs=(\d+)\)', re.M)
_VM_CALL = re.compile(r'emit_call\("([^"]+)", args=\[(.*?)\](?:, dst=|\))')
_HOST_FUNCTION = "__tvm_ffi_"  # the symbol prefix of every compiled TIR function


def _vm_functions(vm_payload: bytes) -> tuple[dict[str, int], dict[str, set[int]]]:
    """(VM function -> arity, each dotted global function it calls -> the argument counts it passes)
    from the serialized bytecode, which TVM reads on any host whatever machine the library is for."""
    import tvm

    executable = tvm.get_global_func("ffi.Module.load_from_bytes.relax.VMExecutable")(bytearray(vm_payload))
    text = executable["as_python"]()
    functions = {name: int(arity) for name, arity in _VM_FUNCTION.findall(text)}
    calls: dict[str, set[int]] = {}
    for name, args in _VM_CALL.findall(text):
        if "." in name:
            calls.setdefault(name, set()).add(len(re.findall(r"\bib\.\w+\(", args)))
    return functions, calls


def _device_module(kind: str, payload: bytes) -> DeviceModule:
    module = DeviceCode.parse(payload)
    try:
        images = device_images(module.fmt, module.data)
    except CudaImageError as err:
        raise MobileVLMError(f"its {kind} device code ({module.fmt}) is unreadable: {err}") from None
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
        vm = next((p for k, p in blob.modules if k == "relax.VMExecutable"), None)
        meta = _metadata(vm) if vm is not None else {}
        vm_functions, runtime_calls = _vm_functions(vm) if vm is not None else ({}, {})
        vm_header = vm_format(vm) if vm is not None else (0, "")
        devices = [_device_module(k, p) for k, p in blob.modules if k not in ("_lib", "relax.VMExecutable")]
    except (
        MobileVLMError,
        LibraryBinError,
        struct.error,
        tarfile.TarError,
        ValueError,
        RuntimeError,
        AttributeError,
    ) as err:
        # RuntimeError: TVM refusing the VM bytecode
        raise MobileVLMError(f"{path}: not a library built by mobilevlm-mlc compile ({err})") from None
    prefix = name[: -len(BLOB_SYMBOL)] or None
    host = set()  # `__tvm_ffi_<name>`, the system-lib prefix before the name in a static library
    for symbol in (n for o in objects for n in elf_symbols(o) if n.startswith(_HOST_FUNCTION)):
        host.add(symbol[len(_HOST_FUNCTION) :].removeprefix(prefix or ""))
    return LibraryReport(path, machines, prefix, meta, devices, vm_functions, host, runtime_calls, vm_header)
