"""An AArch64 Linux userland for qemu-user, made from Debian's arm64 packages and PyPI's AArch64 wheels:
Python 3.11 with the same TVM, TVM FFI and numpy versions as this host's, so that an emulated TVM RPC
server speaks this host's protocol and loads libraries cross-linked with `aarch64-linux-gnu-g++`.

Prepared once per TVM version under the user's cache folder (`$MOBILEVLM_MLC_CACHE`, else
`$XDG_CACHE_HOME/mobilevlm-mlc`, else `~/.cache/mobilevlm-mlc`): built in a temporary folder beside it,
checked by importing TVM under the emulator, then renamed into place, so a half-made sysroot is never
used and a second call finds the first's. Needs, outside Python: `qemu-aarch64` (Debian's `qemu-user`)
and apt's arm64 architecture (`dpkg --add-architecture arm64 && apt-get update`, as root once: `make
system-deps` does both); the packages themselves are downloaded without root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mobilevlm_mlc.errors import MobileVLMError

QEMU = "qemu-aarch64"
PYTHON = "usr/bin/python3.11"
# Debian 12's Python 3.11 and what it and TVM's shared libraries load (C and C++ runtimes, the stdlib's
# extension modules' libraries)
DEBIAN_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libssl3",
    "libcrypt1",
    "libuuid1",
    "libsqlite3-0",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libnsl2",
    "libtirpc3",
    "libdb5.3",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libkrb5support0",
    "libcom-err2",
    "libkeyutils1",
)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # Debian 12: glibc 2.36
PINNED = ("apache-tvm", "apache-tvm-ffi", "numpy")  # the same versions as this host's
SERVER_PACKAGES = ("cloudpickle", "psutil")  # what TVM's rpc_server imports beyond TVM
LAYOUT = 3  # bump when the list of what a sysroot holds changes: an older cached one is not reused


@dataclass(frozen=True)
class Sysroot:
    """A prepared AArch64 userland: `root` for `qemu-aarch64 -L`, `site` for PYTHONPATH."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.root / PYTHON

    def command(self, cpu: str, *args: str) -> list[str]:
        """`python3.11 ARGS` under qemu-user on the CPU model `cpu`."""
        return [QEMU, "-cpu", cpu, "-L", str(self.root), str(self.python), *args]

    def environment(self) -> dict[str, str]:
        """This process's environment for the emulated Python: its packages, none of this host's."""
        drop = ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return env | {"PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1"}


def cache_dir() -> Path:
    explicit = os.environ.get("MOBILEVLM_MLC_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilevlm-mlc"


def _pinned_versions() -> dict[str, str]:
    try:
        return {name: version(name) for name in PINNED}
    except PackageNotFoundError as err:
        raise MobileVLMError(f"emulation needs {err.name} installed on this host to match its version") from None


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MobileVLMError(f"{what}: {err}") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise MobileVLMError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return proc.stdout


def missing_prerequisite() -> str | None:
    """What this machine lacks to prepare and run the sysroot (a root-only step), or None."""
    if shutil.which(QEMU) is None:
        return f"no {QEMU} on PATH (Debian/Ubuntu, as root: apt-get install qemu-user; or `make system-deps`)"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "preparing the AArch64 sysroot needs Debian's apt-get and dpkg"
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in foreign.split():
        return (
            "apt has no arm64 architecture to download the AArch64 Python from (as root, once: "
            "dpkg --add-architecture arm64 && apt-get update; or `make system-deps`)"
        )
    return None


def sysroot_dir() -> Path:
    versions = _pinned_versions()
    return cache_dir() / f"aarch64-py3.11-tvm{versions['apache-tvm']}-ffi{versions['apache-tvm-ffi']}-v{LAYOUT}"


def prepare(progress: Callable[[str], None] | None = None) -> Sysroot:
    """The sysroot for this host's TVM, prepared if it is not there yet (downloads ~90 MB)."""
    final = sysroot_dir()
    if (final / "ready").is_file() and shutil.which(QEMU):
        return Sysroot(final)
    problem = missing_prerequisite()  # what a cached sysroot needs too: the emulator
    if problem:
        raise MobileVLMError(f"emulation: {problem}")
    say = progress or (lambda _: None)
    final.parent.mkdir(parents=True, exist_ok=True)
    # renamed into place when done: the cleanup then finds nothing, which it ignores
    with tempfile.TemporaryDirectory(prefix=".preparing-", dir=final.parent, ignore_cleanup_errors=True) as scratch:
        work = Path(scratch)
        debs = work / "debs"
        debs.mkdir()
        say(f"downloading {len(DEBIAN_PACKAGES)} Debian arm64 packages")
        _run(["apt-get", "download", "-q", *(f"{p}:arm64" for p in DEBIAN_PACKAGES)], "apt-get download", cwd=debs)
        say("unpacking them")
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(work / "root")], f"dpkg -x {deb.name}")
        shutil.rmtree(debs)
        pins = [f"{name}=={v}" for name, v in _pinned_versions().items()]
        say(f"installing AArch64 wheels: {', '.join(pins)}")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(work / "site"), "--no-compile"]
        platform = ["--platform", WHEEL_PLATFORM, "--only-binary", ":all:", "--python-version", "3.11"]
        _run([*pip, *platform, "--implementation", "cp", *pins, *SERVER_PACKAGES], "pip install (AArch64 wheels)")
        candidate = Sysroot(work)
        # Debian's packages leave the byte-compiling to their install scripts and pip was told not to: an
        # emulated Python would compile TVM and the stdlib again at every start (16 s instead of 12 s)
        say("byte-compiling its Python under qemu-aarch64")
        stdlib = candidate.root / "usr/lib/python3.11"
        _run(
            candidate.command("max", "-m", "compileall", "-q", "-j", "0", str(stdlib), str(candidate.site)),
            "compileall under qemu-aarch64",
            env=candidate.environment(),
        )
        say("checking `import tvm` under qemu-aarch64")
        probe = "import tvm, tvm.rpc.server, numpy, cloudpickle; print(tvm.__version__)"
        got = _run(candidate.command("max", "-c", probe), "import tvm under qemu-aarch64", env=candidate.environment())
        if got.strip() != _pinned_versions()["apache-tvm"]:
            raise MobileVLMError(f"the emulated TVM reports version {got.strip()!r}")
        (work / "ready").write_text(got)
        try:
            work.rename(final)
        except OSError:  # another process finished first: its sysroot is as good
            if not (final / "ready").is_file():
                raise
    return Sysroot(final)
