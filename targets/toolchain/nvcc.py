"""CUDA device code compiled ahead of time with nvcc, so the GPU machine needs neither NVRTC nor nvcc.

TVM 0.27 embeds the kernels' CUDA C in the library and compiles it when the library loads. Our CUDA
targets export through `pack_imports`, which compiles that source into one fatbin (SASS for each
listed architecture, plus PTX of the newest so later GPUs can JIT it) and embeds the fatbin instead.

The toolkit is `$CUDA_HOME/bin/nvcc` when `CUDA_HOME` is set, else `nvcc` on PATH. Its version is
recorded in the library's metadata: a fatbin from CUDA 13 needs a driver that supports CUDA 13
(JetPack 6 ships CUDA 12.x drivers: build Jetson libraries with a 12.x toolkit there).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm

from .library_bin import DeviceCode, LibraryBin


class ToolchainError(RuntimeError):
    """A build tool is missing or failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class CudaToolkit:
    nvcc: str
    version: str  # e.g. "13.0.88"

    @classmethod
    def find(cls) -> CudaToolkit:
        home = os.environ.get("CUDA_HOME")
        nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
        where = f"CUDA_HOME={home}" if home else "PATH"
        if not nvcc or not Path(nvcc).is_file():
            raise ToolchainError(f"no nvcc found (looked in {where}); install a CUDA toolkit or point CUDA_HOME at one")
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120, check=True).stdout
        except (OSError, subprocess.SubprocessError) as err:
            raise ToolchainError(f"{nvcc} --version failed: {err}") from None
        match = re.search(r"release [\d.]+, V([\d.]+)", out)
        if not match:
            raise ToolchainError(f"{nvcc} --version printed no CUDA release: {out.strip()[:200]}")
        return cls(nvcc, match.group(1))


@dataclass(frozen=True)
class NvccDeviceCode:
    archs: tuple[str, ...]  # SASS for each, e.g. ("sm_80", "sm_90")

    def gencode_flags(self) -> list[str]:
        flags = []
        for arch in self.archs:
            flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
        newest = self.archs[-1][3:]
        return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]

    def build_info(self) -> dict:
        toolkit = CudaToolkit.find()
        return {
            "device_code": "fatbin",
            "cuda_archs": list(self.archs),
            "ptx": f"compute_{self.archs[-1][3:]}",
            "cuda_toolkit": toolkit.version,
        }

    def describe(self, build: dict) -> str:
        """The build record's device code in words (`build_info` wrote it)."""
        return (
            f"device code: {build['device_code']} for {', '.join(build['cuda_archs'])} + {build['ptx']} PTX, "
            f"CUDA {build['cuda_toolkit']} (needs a driver that supports it)"
        )

    def compile(self, source: str) -> bytes:
        """CUDA C -> fatbin. Flags as TVM's load-time compile, without --use_fast_math (parity first)."""
        toolkit = CudaToolkit.find()
        with tempfile.TemporaryDirectory(prefix="mobilevlm-nvcc-") as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(source)
            cmd = [
                toolkit.nvcc,
                "--fatbin",
                "-O3",
                "--threads",
                "0",
                *self.gencode_flags(),
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "--expt-relaxed-constexpr",
                "-o",
                str(out),
                str(src),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ToolchainError(f"nvcc {toolkit.version} failed on the generated kernels:\n{proc.stderr[-4000:]}")
            return out.read_bytes()

    def pack_imports(self, mod: tvm.runtime.Module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        """`export_library(fpack_imports=...)`: the import blob with every CUDA C module compiled."""
        blob = LibraryBin.parse(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        for i, (kind, payload) in enumerate(blob.modules):
            if kind == "cuda":
                module = DeviceCode.parse(payload)
                if module.fmt == "cuda":
                    module = dataclasses.replace(module, fmt="fatbin", data=self.compile(module.data.decode()))
                blob.modules[i] = (kind, module.serialize())
        host = next(m for m in mod._collect_dso_modules() if m.kind == "llvm")
        llvm_target = host.get_function("_get_target_string")()
        packed = tvm.get_global_func("codegen.codegen_blob")(blob.serialize(), is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path
