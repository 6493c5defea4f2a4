"""`check-kernels`: run a phone build's kernels on this machine and compare each with the same kernel of
this host's CPU build, before any phone is touched. Two kinds of device code run here:

- OpenCL (`android-adreno`), through PoCL: the scheduled PrimFunc is lowered as `relax.build` lowers
  it, the launches (grid, block, arguments) are read off the lowered host function, and the OpenCL C is
  built by PoCL and run with pyopencl.
- AArch64 (`android-cpu`, `arm64-linux`), under qemu-user: the kernels are compiled with the target's
  own flags and schedules for `aarch64-linux-gnu` (a bionic binary cannot run here), cross-linked into one
  library and run on an emulated device of the target's `--cpu` over TVM RPC (`emulation`).

Both builds are made from the dist's model in an fp32 variant (PoCL on x86 has no `cl_khr_fp16`; the
Arm build's fp16 arithmetic is checked whole, against PyTorch, by `verify --target arm64-linux`): same
quantized layout, fp32 activations and scales, so one kernel computes what the other does (the int8
matmuls on both sides round the same activations). Every kernel gets the same random inputs on both.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx
from tvm.tirx.build import codegen_build, split_host_device_mods

from mobilevlm_mlc.compiler import export_model
from mobilevlm_mlc.errors import MobileVLMError, summarize
from mobilevlm_mlc.formats.dist import load_dist
from mobilevlm_mlc.model_defs.mobilevlm import MobileVLMForCausalLM
from mobilevlm_mlc.targets import BuildTarget, get_target

# Kernels the decode step reaches through the KV cache object rather than a direct call.
KV_CACHE_DECODE_KERNELS = ("fused_rope", "tir_kv_cache_transpose_append", "batch_decode_paged_kv")
TOLERANCE = 1e-4  # max |opencl - cpu| / max |cpu|: fp32 kernels, reduction order differs


@dataclass
class KernelResult:
    name: str
    status: str  # "ok", "MISMATCH", "skipped"
    launches: int = 0
    max_rel_error: float = 0.0
    detail: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------- builds


def scheduled_kernels(
    config,
    scheme,
    build_target: BuildTarget,
    like: BuildTarget | None = None,
    cpu: str | None = None,
    emulated: bool = False,
) -> tuple[tvm.target.Target, tvm.IRModule]:
    """The model exported for `build_target` (its `--cpu` preset `cpu`; `emulated`: for the triple that
    runs here under qemu-user) and run through its Relax pipeline (kernels scheduled); with `like`,
    computing what `like`'s build computes (its image resampler precision)."""
    target = build_target.tvm_target(cpu, emulated)
    precision = (like or build_target).image_coefficient_dtype
    mod, _ = export_model(MobileVLMForCausalLM(config, scheme, precision), target)
    with target:
        return target, build_target.relax_pipeline(target)(mod)


def kernels_called(mod: tvm.IRModule, entry: str) -> list[str]:
    """PrimFuncs an entry point calls (in order of first call)."""
    names = re.findall(r"(?:cls\.)?(\w+)\(", mod[entry].script())
    primfuncs = {  # device kernels: the VM's shape functions run on the host
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_host_func"))
    }
    return list(dict.fromkeys(n for n in names if n in primfuncs))


# ---------------------------------------------------------------- inputs


def _param_buffers(func: tirx.PrimFunc) -> list[tuple[str, object]]:
    """(name, parameter) in order: buffer-typed Vars have `.shape`/`.dtype`, scalar ones raise on them."""
    return [(p.name, p) for p in func.params]


class _Sizes(dict):
    """Symbolic dimensions: the given ones, 4 for any other (pages, tokens: small and valid)."""

    def __missing__(self, key: str) -> int:
        if key in _SHAPE_FUNCTIONS:  # a name lookup tries these locals first
            raise KeyError(key)
        return 4


_SHAPE_FUNCTIONS = {"T": types.SimpleNamespace(max=max, min=min)}  # what a printed shape calls (the image's side)


def _shape(buffer, sizes: dict[str, int]) -> tuple[int, ...]:
    dims = []
    for d in buffer.shape:
        if isinstance(d, tirx.IntImm):
            dims.append(int(d))
        else:
            expr = str(d)
            dims.append(int(eval(re.sub(r"T\.int(32|64)\((\d+)\)", r"\2", expr), _SHAPE_FUNCTIONS, _Sizes(sizes))))
    return tuple(dims)


def _paged_decode_inputs(func: tirx.PrimFunc, rng: np.random.Generator) -> dict[str, np.ndarray | float | int]:
    """A valid page table: one sequence of 21 tokens over pages 1 and 3 (page size from `pages`)."""
    params = dict(_param_buffers(func))
    page_size, seq_len = int(params["pages"].shape[3]), 21
    q_shape = [1] + [int(d) for d in params["Q"].shape[1:]]
    pages_shape = [4] + [int(d) for d in params["pages"].shape[1:]]
    return {
        "Q": rng.standard_normal(q_shape, dtype=np.float32),
        "pages": rng.standard_normal(pages_shape, dtype=np.float32),
        "page_table_indptr": np.array([0, 2], np.int32),
        "page_table_values": np.array([1, 3], np.int32),
        "length_info": np.array([seq_len - page_size], np.int32),  # tokens in the last page
        "k_rope_pos_offset": np.array([0], np.int32),
        "q_rope_position": np.array([seq_len - 1], np.int32),
        "output": np.zeros([1, *q_shape[1:]], np.float32),
        "lse": np.zeros([1, q_shape[1]], np.float32),
        "rotary_mode": 0,
        "rope_scale": 1.0,
        "rope_theta": 10000.0,
        "sm_scale": 1.0 / math.sqrt(q_shape[-1]),
    }


SPECIAL_INPUTS: dict[str, Callable] = {"batch_decode_paged_kv": _paged_decode_inputs}


def make_inputs(name: str, func: tirx.PrimFunc, rng: np.random.Generator, sizes: dict[str, int]) -> dict:
    if name in SPECIAL_INPUTS:
        return SPECIAL_INPUTS[name](func, rng)
    values = {}
    for pname, p in _param_buffers(func):
        try:
            dtype, shape = str(p.dtype), _shape(p, sizes)
        except AttributeError:  # scalar parameter (e.g. apply_rope)
            values[pname] = 1
            continue
        if dtype.startswith("float"):
            values[pname] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "uint32":  # packed int4 weights: any bit pattern is valid
            values[pname] = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        else:  # indices and positions: small, in range of every table they index
            values[pname] = rng.integers(0, 4, size=shape).astype(dtype)
    return values


# ---------------------------------------------------------------- CPU reference


def run_cpu(func: tirx.PrimFunc, target: tvm.target.Target, inputs: dict) -> dict[str, np.ndarray]:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args, tensors = [], {}
    for pname, _ in _param_buffers(func):
        value = inputs[pname]
        if isinstance(value, np.ndarray):
            tensors[pname] = tvm.runtime.tensor(value.copy(), tvm.cpu())
            args.append(tensors[pname])
        else:
            args.append(value)
    lib["main"](*args)
    return {k: t.numpy() for k, t in tensors.items()}


# ---------------------------------------------------------------- OpenCL through PoCL


class _HostExpr:
    """The `T` namespace for evaluating the lowered host function's scalar let-bindings."""

    int32 = int64 = uint64 = uint32 = staticmethod(int)
    float32 = staticmethod(float)

    @staticmethod
    def Cast(dtype: str, value):
        return float(value) if dtype.startswith("float") else int(value)

    @staticmethod
    def Div(a, b):
        return a // b if isinstance(a, int) and isinstance(b, int) else a / b

    truncdiv = floordiv = staticmethod(lambda a, b: a // b)
    truncmod = floormod = staticmethod(lambda a, b: a % b)
    max, min = staticmethod(max), staticmethod(min)

    @staticmethod
    def Select(cond, a, b):
        return a if cond else b

    if_then_else = Select

    @staticmethod
    def tvm_struct_get(handle, index, field, _dtype):
        if field == 8:  # DLTensor byte_offset: our buffers start at 0
            return 0
        if field == 17:  # element of a shape array
            return handle[index]
        raise ValueError(f"struct field {field}")


@dataclass
class Launch:
    kernel: str
    args: list[str]  # buffer parameter names or scalar expressions
    extents: dict[str, int]


def _split_args(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += ch in "([" and 1 or ch in ")]" and -1 or 0
        current += ch
    return parts + ([current.strip()] if current.strip() else [])


def lower_for_opencl(func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[str, str]:
    """(lowered host function as TVMScript, OpenCL C of its kernels), as `relax.build` lowers them."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tirx.transform.BindTarget(target)(mod)
    pipeline, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")
    host, devices = split_host_device_mods(pipeline(mod))
    sources = [codegen_build(finalize_device()(dev), t).inspect_source() for t, dev in devices.items()]
    del finalize_host  # the launches are read before host finalization lowers them to packed calls
    return host.script(), "\n".join(sources)


def launches(host_script: str, func: tirx.PrimFunc, shapes: dict[str, tuple[int, ...]], scalars: dict) -> list[Launch]:
    """The kernel launches of a lowered host function, with every extent and scalar evaluated."""
    env: dict[str, object] = {f"main_{name}_shape": list(shape) for name, shape in shapes.items()}
    env.update(scalars)
    for name in shapes:
        env[f"{name}_handle"] = name
    aliases: dict[str, str] = {}
    result = []
    for line in host_script.splitlines():
        line = line.strip()
        if m := re.match(r"(\w+): T\.let\[[^\]]*\] = (.+)$", line):
            try:
                env[m.group(1)] = eval(m.group(2), {"T": _HostExpr}, env)
            except Exception:  # noqa: BLE001 (handles, type checks: not scalars we need)
                pass
        elif m := re.match(r"(\w+) = (?:T\.decl_buffer\(.*\bdata=(\w+)\.data\b|(\w+)\.view\()", line):
            aliases[m.group(1)] = m.group(2) or m.group(3)
        elif m := re.match(r"(\w+) = T\.decl_buffer\(.*T\.tvm_struct_get\((\w+)_handle, 0, 1,", line):
            aliases[m.group(1)] = m.group(2)
        elif m := re.match(r'T\.call_ffi_kernel\("(\w+)", (.*), launch_params=\[([^\]]*)\]', line):
            tags = [t.strip().strip('"') for t in m.group(3).split(",") if t.strip()]
            args = _split_args(m.group(2))
            extents_exprs, args = args[len(args) - len(tags) :], args[: len(args) - len(tags)]
            extents = {tag: int(eval(e, {"T": _HostExpr}, env)) for tag, e in zip(tags, extents_exprs)}
            resolved = []
            for arg in args:
                if arg.endswith(".data"):
                    name = arg[: -len(".data")]
                    seen = {name}
                    while name in aliases and name not in shapes and aliases[name] not in seen:
                        name = aliases[name]
                        seen.add(name)
                    if name not in shapes:
                        raise ValueError(f"kernel argument {arg} is not a parameter buffer (global scratch)")
                    resolved.append(name)
                else:
                    resolved.append(eval(arg, {"T": _HostExpr}, env))
            result.append(Launch(m.group(1), resolved, extents))
    return result


_CL_SCALARS = {"int": np.int32, "long": np.int64, "uint": np.uint32, "ulong": np.uint64, "float": np.float32}


def _kernel_signatures(source: str) -> dict[str, list[str]]:
    """kernel name -> C type of each parameter."""
    out = {}
    for name, params in re.findall(r"__kernel void (\w+)\(([^)]*)\)", source):
        out[name] = [p.strip().rsplit(" ", 1)[0] for p in params.split(",") if p.strip()]
    return out


def run_opencl(context, queue, source: str, launch_list: list[Launch], inputs: dict) -> dict[str, np.ndarray]:
    import pyopencl as cl

    program = cl.Program(context, source).build()
    signatures = _kernel_signatures(source)
    arrays = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    buffers = {
        k: cl.Buffer(context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=v)
        for k, v in arrays.items()
        if v.size
    }
    for launch in launch_list:
        kernel = getattr(program, launch.kernel)
        ctypes = signatures[launch.kernel]
        args = []
        for ctype, arg in zip(ctypes, launch.args):
            if isinstance(arg, str):
                args.append(buffers[arg])
            else:
                args.append(_CL_SCALARS[ctype.split()[-1]](arg))
        grid = [launch.extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
        block = [launch.extents.get(f"threadIdx.{a}", 1) for a in "xyz"]
        kernel(queue, [g * b for g, b in zip(grid, block)], block, *args)
    queue.finish()
    for name, buf in buffers.items():
        cl.enqueue_copy(queue, arrays[name], buf)
    return arrays


# ---------------------------------------------------------------- the check


def _compare(cpu: dict[str, np.ndarray], gpu: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, ref in cpu.items():
        if ref.dtype.kind != "f":
            if not np.array_equal(ref, gpu[name]):
                return math.inf
            continue
        scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-6)
        err = float(np.abs(ref.astype(np.float64) - gpu[name]).max()) / scale if ref.size else 0.0
        worst = max(worst, err if np.isfinite(err) else math.inf)
    return worst


class PoclRunner:
    """OpenCL kernels on PoCL, one program per kernel."""

    def __init__(self, build_target: BuildTarget, cpu: str | None, device_target, cpu_target, say) -> None:
        del build_target, cpu, say
        try:
            import pyopencl as cl
        except ImportError:
            raise MobileVLMError(
                "check-kernels needs pyopencl and an OpenCL CPU driver: pip install pyopencl pocl-binary-distribution"
            ) from None
        platforms = cl.get_platforms()
        if not platforms:
            raise MobileVLMError(
                "no OpenCL platform found (install Debian's pocl-opencl-icd or pip's pocl-binary-distribution)"
            )
        self.context = cl.Context(platforms[0].get_devices()[:1])
        self.queue = cl.CommandQueue(self.context)
        # lowered with this machine as host, so the host code is only read, never run
        self.target = tvm.target.Target(device_target, host=cpu_target)

    def __enter__(self) -> PoclRunner:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def prepare(self, kernels: dict[str, tirx.PrimFunc]) -> None:
        del kernels  # each is built when it runs

    def run(self, name: str, func: tirx.PrimFunc, inputs: dict) -> tuple[dict[str, np.ndarray] | str, int]:
        """(outputs, launches), or (why it was skipped, 0)."""
        host_script, source = lower_for_opencl(func, self.target)
        shapes = {k: v.shape for k, v in inputs.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}
        try:
            launch_list = launches(host_script, func, shapes, scalars)
        except (ValueError, KeyError, NameError, TypeError) as err:
            return f"launch not reproducible here: {err}", 0
        if "half" in source and "cl_khr_fp16" in source:
            return "uses fp16 (PoCL on x86 has no cl_khr_fp16)", 0
        return run_opencl(self.context, self.queue, source, launch_list, inputs), len(launch_list)


class EmulatedArmRunner:
    """AArch64 kernels in one cross-linked library on an emulated device of the target's `--cpu`."""

    def __init__(self, build_target: BuildTarget, cpu: str | None, device_target, cpu_target, say) -> None:
        from mobilevlm_mlc.emulation import emulated_device

        del cpu_target
        self.build_target, self.target = build_target, device_target
        self.device = emulated_device(build_target, cpu, say)
        self.say = say or (lambda _: None)
        self.module = None

    def __enter__(self) -> EmulatedArmRunner:
        self.device.start()
        self.session = self.device.session()
        self.say(
            f"{self.build_target.name} kernels ({self.target.attrs['mcpu']}) run on qemu-aarch64 -cpu {self.device.cpu}"
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        self.device.close()

    def prepare(self, kernels: dict[str, tirx.PrimFunc]) -> None:
        """Compile every kernel into one library, upload it and load it on the device."""
        import tempfile

        from tvm.support import cc

        mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in kernels.items()})
        lib = tvm.compile(mod, target=self.target)
        with tempfile.TemporaryDirectory(prefix="mobilevlm-kernels-") as scratch:
            path = Path(scratch) / "kernels.so"
            lib.export_library(
                str(path), fcompile=cc.cross_compiler(self.build_target.linker or "aarch64-linux-gnu-g++")
            )
            self.module = self.session.load_library(path)

    def run(self, name: str, func: tirx.PrimFunc, inputs: dict) -> tuple[dict[str, np.ndarray] | str, int]:
        device = self.session.device("cpu")
        args, tensors = [], {}
        for pname, _ in _param_buffers(func):
            value = inputs[pname]
            if isinstance(value, np.ndarray):
                tensors[pname] = tvm.runtime.tensor(value.copy(), device)
                args.append(tensors[pname])
            else:
                args.append(value)
        self.module[name](*args)
        return {k: t.numpy() for k, t in tensors.items()}, 1


def _runner_for(build_target: BuildTarget) -> type[PoclRunner] | type[EmulatedArmRunner]:
    """How `build_target`'s device code runs here: PoCL for OpenCL, qemu-user for AArch64 code."""
    if build_target.codegen == "opencl":
        return PoclRunner
    if build_target.codegen == "llvm" and build_target.emulated_triple:
        return EmulatedArmRunner
    raise MobileVLMError(
        f"check-kernels runs OpenCL kernels (PoCL) and Arm CPU kernels (qemu-user); target "
        f"'{build_target.name}' generates {build_target.codegen} code for this machine's own runtime"
    )


def check_kernels(
    dist_dir: Path,
    target_name: str = "android-adreno",
    entries: Iterable[str] = ("decode", "image_embed"),
    only: Iterable[str] | None = None,
    seed: int = 0,
    progress: Callable[[KernelResult], None] | None = None,
    cpu: str | None = None,
    say: Callable[[str], None] | None = None,
) -> list[KernelResult]:
    dist = load_dist(dist_dir)
    device_def = get_target(target_name)
    try:
        device_def.cpu(cpu)
    except ValueError as err:
        raise MobileVLMError(str(err)) from None
    runner_class = _runner_for(device_def)
    config = dataclasses.replace(dist.config, dtype="float32")
    scheme = dist.quantization.scheme and dataclasses.replace(dist.quantization.scheme, model_dtype="float32")
    device_target, device_mod = scheduled_kernels(config, scheme, device_def, cpu=cpu, emulated=True)
    cpu_def = get_target("cpu")
    cpu_target, cpu_mod = scheduled_kernels(config, scheme, cpu_def, like=device_def)

    names = list(only) if only else []
    functions = {gv.name_hint for gv in device_mod.get_global_vars()}
    unknown = [name for name in names if name not in functions]
    if unknown:
        raise MobileVLMError(
            f"--kernels: not kernels of the {target_name} build: {summarize(unknown, 'name', 'names')}"
        )
    if not only:
        for entry in entries:
            if entry not in functions:
                raise MobileVLMError(f"--entries: '{entry}' is not an entry point of the model")
            names += kernels_called(device_mod, entry)
        if "decode" in entries:
            names += KV_CACHE_DECODE_KERNELS
        names = list(dict.fromkeys(names))
    device_names = {g.name_hint for g in device_mod.get_global_vars()}
    cpu_names = {g.name_hint for g in cpu_mod.get_global_vars()}
    # each kernel by the name it has in each build (a pipeline may swap TVM's kernel for its own)
    pairs = {
        name: (device_def.kernel_renames.get(name, name), cpu_def.kernel_renames.get(name, name)) for name in names
    }
    present = {n: p for n, p in pairs.items() if p[0] in device_names and p[1] in cpu_names}
    rng = np.random.default_rng(seed)
    sizes = {"seq_len": 1, "batch_size": 1, "B": 1}
    results = []
    with runner_class(device_def, cpu, device_target, cpu_target, say) as runner:
        runner.prepare({device: device_mod[device] for device, _ in present.values()})
        for name in names:
            started = time.perf_counter()
            if name not in present:
                result = KernelResult(name, "skipped", detail="not in both builds")
            else:
                device_name, cpu_name = present[name]
                result = _check_one(
                    name, device_name, device_mod[device_name], cpu_mod[cpu_name], cpu_target, runner, rng, sizes
                )
            result.seconds = time.perf_counter() - started
            results.append(result)
            if progress:
                progress(result)
    return results


def _check_one(name, device_name, device_func, cpu_func, cpu_target, runner, rng, sizes) -> KernelResult:
    inputs = make_inputs(name, cpu_func, rng, sizes)
    expected = run_cpu(cpu_func, cpu_target, inputs)
    written = [k for k, v in expected.items() if not np.array_equal(v, inputs[k])]
    if not written:  # nothing to compare would make any kernel pass
        return KernelResult(name, "skipped", detail="the CPU kernel wrote no output on these inputs")
    got, count = runner.run(device_name, device_func, inputs)
    if isinstance(got, str):
        return KernelResult(name, "skipped", detail=got)
    error = _compare(expected, got)
    status = "ok" if error <= TOLERANCE else "MISMATCH"
    return KernelResult(name, status, count, error, detail=f"outputs {', '.join(written)}")
