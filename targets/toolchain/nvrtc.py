"""CUDA device code compiled ahead of time with NVRTC from PyPI: the CUDA 12 compiler as a dependency.

A Jetson Orin under JetPack 6 has a CUDA 12 driver, which cannot load SASS or JIT PTX from the CUDA 13
toolkit found on most build machines. PyPI has no CUDA 12 `nvcc` driver, but it has NVRTC
(`nvidia-cuda-nvrtc-cu12`), which compiles CUDA C straight to a cubin of one architecture, and the headers
TVM's CUDA C includes: `nvidia-cuda-runtime-cu12` (`cuda_fp16.h`, ...) and `nvidia-cuda-cccl-cu12`
(`cuda/std/cstdint`). Orin is one architecture (sm_87), so one cubin is the
whole device code: SASS only, nothing for the driver to JIT. The `jetson` extra pins the wheels to CUDA
12.2, JetPack 6.0's release, so every JetPack 6 driver (12.2 and newer) loads what they build.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .cuda_device_code import CudaDeviceCode, ToolchainError

NVRTC_PACKAGE = "nvidia-cuda-nvrtc-cu12"
HEADER_PACKAGES = {  # module -> wheel, and a header TVM's CUDA C includes from it
    "nvidia.cuda_runtime": ("nvidia-cuda-runtime-cu12", "cuda_fp16.h"),
    "nvidia.cuda_cccl": ("nvidia-cuda-cccl-cu12", "cuda/std/cstdint"),
}
INSTALL_HINT = "pip install 'mobilevlm-mlc[jetson]'"


@contextlib.contextmanager
def _thread_locale_kept() -> Iterator[None]:
    """NVRTC 12.2 leaves the calling thread on the C locale (`uselocale`): afterwards Python's default
    text encoding there was ASCII (`open`, `subprocess` output: a UnicodeDecodeError on the next non-ASCII
    byte). The thread's locale is put back after each compilation."""
    libc = ctypes.CDLL(None)
    libc.uselocale.restype = ctypes.c_void_p
    libc.uselocale.argtypes = [ctypes.c_void_p]
    saved = libc.uselocale(None)  # null: only asks for the thread's current locale
    try:
        yield
    finally:
        libc.uselocale(saved)


def _package_dir(module: str, package: str) -> Path:
    """The folder of one of NVIDIA's wheels (they share the namespace package `nvidia`)."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError(f"no {package} installed (the CUDA 12 compiler from PyPI); {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Nvrtc:
    """The NVRTC library of `nvidia-cuda-nvrtc-cu12` and the CUDA headers it compiles against."""

    library: Path
    includes: tuple[Path, ...]
    version: str  # the wheel's, e.g. "12.2.140"

    @classmethod
    def find(cls) -> Nvrtc:
        library = _package_dir("nvidia.cuda_nvrtc", NVRTC_PACKAGE) / "lib" / "libnvrtc.so.12"
        if not library.is_file():
            raise ToolchainError(f"{NVRTC_PACKAGE} has no {library.name} (found {library.parent}); reinstall it")
        includes = []
        for module, (package, header) in HEADER_PACKAGES.items():
            include = _package_dir(module, package) / "include"
            if not (include / header).is_file():
                raise ToolchainError(f"{package} has no {header} in {include}; reinstall it")
            includes.append(include)
        return cls(library, tuple(includes), importlib.metadata.version(NVRTC_PACKAGE))

    def compile(self, source: str, arch: str, options: list[str]) -> bytes:
        """CUDA C -> cubin for `arch` (e.g. "sm_87"); a ToolchainError with NVRTC's log on failure."""
        try:
            lib = ctypes.CDLL(str(self.library))
        except OSError as err:
            raise ToolchainError(f"cannot load {self.library}: {err}") from None
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p

        def check(result: int, step: str) -> None:
            if result != 0:
                raise ToolchainError(f"NVRTC {self.version} {step}: {lib.nvrtcGetErrorString(result).decode()}")

        with _thread_locale_kept():
            program = ctypes.c_void_p()
            check(
                lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0, None, None),
                "could not take the generated kernels",
            )
            try:
                args = [f"--gpu-architecture={arch}", *(f"--include-path={i}" for i in self.includes), *options]
                argv = (ctypes.c_char_p * len(args))(*(a.encode() for a in args))
                result = lib.nvrtcCompileProgram(program, len(args), argv)
                if result != 0:
                    size = ctypes.c_size_t()
                    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
                    log = ctypes.create_string_buffer(size.value)
                    lib.nvrtcGetProgramLog(program, log)
                    raise ToolchainError(
                        f"NVRTC {self.version} failed on the generated kernels:\n{log.value.decode(errors='replace')[-4000:]}"
                    )
                size = ctypes.c_size_t()
                check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "gave no cubin")
                cubin = ctypes.create_string_buffer(size.value)
                check(lib.nvrtcGetCUBIN(program, cubin), "gave no cubin")
                return cubin.raw
            finally:
                lib.nvrtcDestroyProgram(ctypes.byref(program))


@dataclass(frozen=True)
class NvrtcDeviceCode(CudaDeviceCode):
    """One SASS cubin per library, from NVRTC: for a device of exactly one architecture (Jetson Orin)."""

    def __post_init__(self) -> None:
        if len(self.archs) != 1:
            raise ValueError(f"a cubin holds one architecture, not {self.archs}")

    def build_info(self) -> dict:
        return {
            "device_code": "cubin",
            "cuda_archs": list(self.archs),
            "ptx": None,
            "cuda_toolkit": Nvrtc.find().version,
            "cuda_compiler": "nvrtc",
        }

    def compile(self, source: str) -> tuple[str, bytes]:
        return "cubin", Nvrtc.find().compile(source, self.archs[0], ["--std=c++17"])
