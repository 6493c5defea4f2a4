"""Arm CPUs on this x86 machine: an AArch64 userland (`sysroot`) run by qemu-user on the QEMU CPU model
closest to the target's `--cpu`, serving TVM RPC (`device`). `runs_on` gives the place a target's
library runs from here. Imports `runtime` and `targets`; the checks and the CLI import it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.backend import RemoteSession, parse_tracker
from mobilevlm_mlc.targets import BuildTarget

from .device import EmulatedDevice
from .sysroot import Sysroot, prepare

__all__ = ["EmulatedDevice", "Sysroot", "emulated_device", "prepare", "runs_on"]


def emulated_device(
    build_target: BuildTarget,
    cpu: str | None = None,
    progress: Callable[[str], None] | None = None,
    tracker: str | None = None,
    key: str | None = None,
) -> EmulatedDevice:
    """An (unstarted) emulated device for `build_target`'s code on its `--cpu` preset `cpu`."""
    if build_target.emulated_triple is None:
        raise MobileVLMError(f"target '{build_target.name}' does not run under qemu-user here")
    try:
        preset = build_target.cpu(cpu)
    except ValueError as err:
        raise MobileVLMError(str(err)) from None
    if tracker is not None:
        parse_tracker(tracker)
    say = progress or (lambda _: None)
    sysroot = prepare(say)
    if preset.emulator == "max":
        say(f"QEMU has no model of {preset.mcpu}: emulating -cpu max (every extension it knows)")
    return EmulatedDevice(sysroot, preset.emulator, tracker, key)


@contextmanager
def runs_on(
    build_target: BuildTarget, cpu: str | None = None, progress: Callable[[str], None] | None = None
) -> Iterator[RemoteSession | None]:
    """Where a library of `build_target` runs from here: this process (None) for a target without an
    emulated triple, else a session on an emulated device that lives as long as the block."""
    if build_target.emulated_triple is None:
        yield None
        return
    say = progress or (lambda _: None)
    with emulated_device(build_target, cpu, say) as device:
        say(f"emulated AArch64 RPC server up (qemu-aarch64 -cpu {device.cpu})")
        yield device.session()
