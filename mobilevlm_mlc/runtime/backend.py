"""Where a library runs: in this process (`LocalBackend`), or on a device reached through TVM RPC
(`RemoteSession`), as Android's TVM RPC app and Jetsons are: a tracker hands out a session to a device
registered under a key; the library is uploaded and loaded there, weights are copied into its memory,
and the engine drives the run from here (each call is a round trip).

The engine talks to both through the same few calls; what differs is how a value that RPC cannot carry
(a shape, a Python list, a tuple result) is made on the side where the library runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm import rpc
from tvm.runtime import ShapeTuple

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.targets.toolchain.elf import host_machine

from .host_memory import HugePageArena
from .threads import use_threads

DEVICE_KINDS = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")


def parse_device(name: str) -> tuple[str, int]:
    """'cpu', 'cuda:1', ... -> (kind, index); anything else is a MobileVLMError."""
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise MobileVLMError(f"device {name!r}: expected one of {', '.join(DEVICE_KINDS)}, optionally with ':INDEX'")
    return kind, int(index or 0)


class Backend(ABC):
    """The side a library runs on."""

    machine: str | None  # the ELF machine its libraries must be built for (None: not known from here)

    @abstractmethod
    def device(self, name: str) -> tvm.runtime.Device:
        """The device `name` ('cpu', 'cuda:1') there; refused when it is not present."""

    @abstractmethod
    def load_library(self, path: Path) -> tvm.runtime.Module: ...

    @abstractmethod
    def shape(self, *dims: int) -> object:
        """A shape argument of an entry point or builtin."""

    @abstractmethod
    def pair(self, result: object) -> tuple[object, object]:
        """The two values of an entry point's tuple result (logits, KV cache)."""

    @abstractmethod
    def function(self, name: str):
        """A global function of the TVM runtime there."""

    def builtin(self, name: str):
        """A `vm.builtin.*` function (KV cache, reshape, memory manager)."""
        return self.function(f"vm.builtin.{name}")

    @staticmethod
    def view(tensor: tvm.runtime.Tensor, shape: tuple[int, ...], byte_offset: int) -> tvm.runtime.Tensor:
        """A view of part of a tensor's memory, no copy. Made on this side for a remote tensor too: a
        remote tensor is a local descriptor of remote memory, which RPC sends as a pointer and offset."""
        return tensor._create_view(shape, tensor.dtype, byte_offset)

    @abstractmethod
    def param_array(self, tensors: list[tvm.runtime.Tensor]) -> object:
        """The parameter array the entry points take as their last argument."""

    def weight_placement(self, device: tvm.runtime.Device) -> Callable[[np.ndarray], tvm.runtime.Tensor] | None:
        """Where the weights go on `device` (None: `tvm.runtime.tensor`, a copy into TVM's allocation)."""
        return None


class LocalBackend(Backend):
    """The library runs in this process."""

    def __init__(self) -> None:
        self.machine = host_machine()
        use_threads()  # --threads, where a command takes it, sized the pool before this

    def device(self, name: str) -> tvm.runtime.Device:
        device = tvm.device(*parse_device(name))
        if not device.exist:
            raise MobileVLMError(f"device {name!r} is not present on this machine")
        return device

    def load_library(self, path: Path) -> tvm.runtime.Module:
        return tvm.runtime.load_module(str(path))

    def shape(self, *dims: int) -> ShapeTuple:
        return ShapeTuple(dims)

    def pair(self, result) -> tuple[object, object]:
        return result[0], result[1]

    def function(self, name: str):
        return tvm.get_global_func(name)

    def param_array(self, tensors: list[tvm.runtime.Tensor]) -> list[tvm.runtime.Tensor]:
        return tensors

    def weight_placement(self, device: tvm.runtime.Device) -> Callable[[np.ndarray], tvm.runtime.Tensor] | None:
        """On this process's CPU, in 2 MiB pages (`host_memory`)."""
        return HugePageArena().tensor if device.dlpack_device_type() == tvm.cpu().dlpack_device_type() else None


class RemoteSession(Backend):
    """A device behind an RPC tracker (`connect`). Global functions are looked up once: each lookup is a
    round trip."""

    machine = None  # the remote machine's kind is not visible before loading (the server runs no Python of ours)

    def __init__(self, session: rpc.RPCSession, tracker: str, key: str):
        self.session, self.tracker, self.key = session, tracker, key
        self._functions: dict[str, object] = {}

    def function(self, name: str):
        if name not in self._functions:
            self._functions[name] = self.session.get_function(name)
        return self._functions[name]

    def device(self, name: str) -> tvm.runtime.Device:
        local = tvm.device(*parse_device(name))
        return self.session.device(local.dlpack_device_type(), local.index)

    def load_library(self, path: Path) -> tvm.runtime.Module:
        self.session.upload(str(path), path.name)
        return self.session.load_module(path.name)

    def shape(self, *dims: int) -> object:
        return self.function("ffi.Shape")(*dims)  # RPC cannot carry shape objects: made over there

    def pair(self, result) -> tuple[object, object]:
        get = self.function("ffi.ArrayGetItem")  # the tuple stays remote
        return get(result, 0), get(result, 1)

    def param_array(self, tensors: list[tvm.runtime.Tensor]) -> object:
        # RPC carries no Python lists: the array is built on the device's side. The caller keeps
        # `tensors` alive as long as the array: freeing a remote tensor's handle frees it under the array.
        return self.function("ffi.Array")(*tensors)

    def environment(self) -> dict:
        """What this side can learn of the remote machine (the RPC server runs no Python of ours)."""
        return {"cpu": None, "cores": None, "rpc_tracker": self.tracker, "rpc_key": self.key}

    def peak_rss_mib(self) -> None:
        return None  # not observable through RPC


def parse_tracker(tracker: str) -> tuple[str, int]:
    """An RPC tracker's 'HOST:PORT' as (host, port)."""
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MobileVLMError(f"--rpc-tracker {tracker!r}: expected HOST:PORT")
    return host, int(port)


def connect(tracker: str, key: str, timeout_s: int = 60) -> RemoteSession:
    host, port = parse_tracker(tracker)
    try:
        client = rpc.connect_tracker(host, port)
        session = client.request(key, priority=1, session_timeout=0, max_retry=max(1, timeout_s // 5))
    except (RuntimeError, OSError, TimeoutError) as err:
        raise MobileVLMError(
            f"no device under key {key!r} from the RPC tracker at {tracker} ({first_line(err)})"
        ) from None
    return RemoteSession(session, tracker, key)
