"""CUDA device code compiled ahead of time with nvcc: one fatbin with SASS for each architecture plus PTX of
the newest, so later GPUs can JIT it.

The toolkit is `$CUDA_HOME/bin/nvcc` when `CUDA_HOME` is set, else `nvcc` on PATH. Its release is recorded
in the library's metadata and in the images (`cuda_images.py`): the library needs a driver of that CUDA
release or newer (Jetson libraries use NVRTC 12.2 from PyPI instead: `nvrtc.py`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cuda_device_code import CudaDeviceCode, ToolchainError


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
class NvccDeviceCode(CudaDeviceCode):
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
            "cuda_compiler": "nvcc",
        }

    def compile(self, source: str) -> tuple[str, bytes]:
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
            return "fatbin", out.read_bytes()
