"""What a build target is: the TVM target, the Relax pipeline, the quantizations it takes, and what the
output file is (a shared library, or a static `.tar` system library with a symbol prefix for apps)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm.support import cc

from mobilevlm_mlc.model_defs.quantization import GroupQuantScheme
from mobilevlm_mlc.targets.toolchain.cuda_device_code import CudaDeviceCode, ToolchainError


class KernelCheckError(Exception):
    """A kernel the target cannot run (unscheduled, or over the target's limits); names the kernel."""


@dataclass(frozen=True)
class ArmCpu:
    """A `--cpu` preset of an Arm target: the core LLVM tunes and selects instructions for, and the QEMU
    CPU model that runs that code here (one with the same extensions the kernels use: dotprod, fp16)."""

    mcpu: str
    emulator: str  # `qemu-aarch64 -cpu` model; "max" (every extension) only where QEMU has none close
    board: str


@dataclass(frozen=True)
class BuildTarget:
    name: str
    description: str
    make_target: Callable[..., tvm.target.Target]  # (mcpu, mtriple) for targets with `cpus`
    default_quantization: str
    quantizations: tuple[str, ...]
    pipeline: Callable[[tvm.target.Target], tvm.transform.Pass]
    codegen: str  # TVM's code generator for the device code: `target.build.<codegen>`
    system_lib: bool = False  # static `.tar` of objects registering `<prefix>` symbols (Android / iOS apps)
    provider: str = ""  # where to get a TVM with this code generator, when the installed one lacks it
    device_code: CudaDeviceCode | None = None  # compiles embedded device source ahead of time (CUDA)
    linker: str | None = None  # cross C++ compiler linking the shared library (None: this host's)
    linker_package: str = ""  # where the cross linker comes from
    numerics: Callable[[tvm.target.Target, str, GroupQuantScheme | None], dict] | None = (
        None  # arithmetic chosen from the CPU's features
    )
    # kernels this target's pipeline swaps for its own, TVM's name -> ours (`check-kernels` pairs them up)
    kernel_renames: dict[str, str] = field(default_factory=dict)
    float64: bool = True  # the device computes in fp64 (Adreno's OpenCL and most Vulkan devices do not)
    cpus: dict[str, ArmCpu] = field(default_factory=dict)  # `--cpu` presets, the default first
    # this target's code built for this LLVM triple runs here under qemu-user (Android's bionic does not)
    emulated_triple: str | None = None
    device: str = "cpu"  # the TVM device its libraries compute on
    int8_kv_cache: bool = False  # its pipeline takes `int8_kv=True`: K and V stored in 8 bits (`--kv-cache int8`)

    @property
    def runs_on_this_machine(self) -> bool:
        """Its libraries load on this host (its own code, or under qemu-user), given the device."""
        return not self.system_lib and (self.linker is None or self.emulated_triple is not None)

    @property
    def default_cpu(self) -> str | None:
        return next(iter(self.cpus), None)

    def cpu(self, name: str | None) -> ArmCpu | None:
        """The `--cpu` preset `name` (None: the default); a ValueError naming the choices otherwise."""
        if name is None or name in self.cpus:
            return self.cpus.get(name or self.default_cpu)
        choices = f"expected one of {', '.join(self.cpus)}" if self.cpus else "it has no --cpu presets"
        raise ValueError(f"--cpu {name!r}: not a CPU of target '{self.name}' ({choices})")

    @property
    def image_coefficient_dtype(self) -> str:
        """The precision of the image resampler's coefficients (`model_defs/image_processing.py`)."""
        return "float64" if self.float64 else "float32"

    @property
    def library_suffix(self) -> str:
        return ".tar" if self.system_lib else ".so"

    def tvm_target(self, cpu: str | None = None, emulated: bool = False) -> tvm.target.Target:
        """The TVM target, for the `--cpu` preset `cpu` where the target has presets; `emulated`: the
        same code for the triple that runs here under qemu-user."""
        preset = self.cpu(cpu)
        if preset is None:
            return self.make_target()
        return self.make_target(preset.mcpu, self.emulated_triple if emulated else None)

    def relax_pipeline(self, target: tvm.target.Target, int8_kv: bool = False) -> tvm.transform.Pass:
        with target:
            return self.pipeline(target, int8_kv=True) if int8_kv else self.pipeline(target)

    def missing_codegen(self) -> str | None:
        """Why the installed TVM cannot build this target, or None if it can."""
        if tvm.get_global_func(f"target.build.{self.codegen}", allow_missing=True) is None:
            return f"this TVM has no '{self.codegen}' code generator (target.build.{self.codegen}); {self.provider}"
        return None

    def missing_toolchain(self) -> str | None:
        """Which build tool outside TVM (nvcc, a cross linker) is missing, or None."""
        if self.linker and shutil.which(self.linker) is None:
            return f"no cross linker '{self.linker}' on PATH ({self.linker_package})"
        if self.device_code:
            try:
                self.device_code.build_info()
            except ToolchainError as err:
                return str(err)
        return None

    def build_info(self, target: tvm.target.Target, dtype: str, scheme: GroupQuantScheme | None) -> dict:
        """What the library records about how it was built (the CUDA toolkit, int8 prefill matmuls)."""
        info = {"target": self.name, "tvm": tvm.__version__}
        info |= self.numerics(target, dtype, scheme) if self.numerics else {}
        return info | (self.device_code.build_info() if self.device_code else {})

    def describe_build(self, report: dict) -> list[str]:
        """What `compile` prints about a library beyond its path and timings: its device code, and the
        name an app links a system library by."""
        lines = [self.device_code.describe(report["build"])] if self.device_code else []
        if self.system_lib:
            prefix = report["system_lib_prefix"]
            lines.append(f"system library: model_lib '{prefix.rstrip('_')}' (symbol prefix {prefix})")
        return lines

    def export_options(self) -> dict:
        """Keyword arguments for `export_library`: device-code packing and cross linking."""
        options = {}
        if self.device_code:
            options["fpack_imports"] = self.device_code.pack_imports
        if self.linker:
            options["fcompile"] = cc.cross_compiler(self.linker)
        return options
