"""CUDA device code compiled ahead of time and embedded in the library, so the GPU machine loads it with
the driver alone (TVM 0.27 would embed the kernels' CUDA C and compile it when the library loads).

The compilers (`nvcc.py`: a fatbin from a full toolkit; `nvrtc.py`: a cubin from PyPI's NVRTC) share the
export step here: `export_library(fpack_imports=...)` gets the import blob with every CUDA C module
replaced by the compiled images, which are then checked against the target's architectures and driver.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import tvm

from .cuda_images import CudaImageError, device_images, driver_problems, oldest_driver, release_key, release_of
from .library_bin import DeviceCode, LibraryBin


class ToolchainError(RuntimeError):
    """A build tool is missing or failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class CudaDeviceCode:
    archs: tuple[str, ...]  # SASS for each, e.g. ("sm_80", "sm_90")
    driver: str | None = None  # the CUDA release of the driver it must load on (None: the toolkit's own)
    driver_name: str = ""  # who ships that driver, e.g. "JetPack 6.0"

    def build_info(self) -> dict:
        """What the build record says about the device code and the compiler (checks it is there)."""
        raise NotImplementedError

    def compile(self, source: str) -> tuple[str, bytes]:
        """CUDA C -> (TVM module format, data for `cuModuleLoadData`)."""
        raise NotImplementedError

    def describe(self, build: dict) -> str:
        """The build record's device code in words (`build_info` wrote it)."""
        ptx = f" + {build['ptx']} PTX" if build.get("ptx") else " (SASS only)"
        compiler = build.get("cuda_compiler", "nvcc")
        return f"device code: {build['device_code']} for {', '.join(build['cuda_archs'])}{ptx}, {compiler} CUDA {build['cuda_toolkit']}"

    def check(self, fmt: str, data: bytes) -> None:
        """Refuse device code the target's driver cannot load (a newer toolkit than the `jetson` extra pins)."""
        try:
            images = device_images(fmt, data)
        except CudaImageError as err:
            raise ToolchainError(f"the compiled device code is unreadable: {err}") from None
        build = self.build_info()
        toolkit = release_of(build["cuda_toolkit"])
        problems = driver_problems(images, self.archs, self.driver)
        if self.driver and release_key(toolkit) > release_key(self.driver):
            problems.append(f"built by {build['cuda_compiler']} CUDA {build['cuda_toolkit']}, newer than the driver")
        if problems:
            where = f" ({self.driver_name})" if self.driver_name else ""
            raise ToolchainError(
                f"device code needs a CUDA {oldest_driver(images, toolkit)} driver, the target's is "
                f"{self.driver}{where}: " + "; ".join(problems)
            )

    def pack_imports(self, mod: tvm.runtime.Module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        """`export_library(fpack_imports=...)`: the import blob with every CUDA C module compiled."""
        blob = LibraryBin.parse(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        for i, (kind, payload) in enumerate(blob.modules):
            if kind == "cuda":
                module = DeviceCode.parse(payload)
                if module.fmt == "cuda":
                    fmt, data = self.compile(module.data.decode())
                    self.check(fmt, data)
                    module = dataclasses.replace(module, fmt=fmt, data=data)
                blob.modules[i] = (kind, module.serialize())
        host = next(m for m in mod._collect_dso_modules() if m.kind == "llvm")
        llvm_target = host.get_function("_get_target_string")()
        packed = tvm.get_global_func("codegen.codegen_blob")(blob.serialize(), is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path
