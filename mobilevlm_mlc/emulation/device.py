"""An Arm device on this machine: TVM's own RPC serving loop, run by the AArch64 Python of the sysroot under
qemu-user on a named CPU model, listening on 127.0.0.1. The engine reaches it as it reaches a phone or a
Jetson (`runtime.backend.RemoteSession`): the library is uploaded, loaded and run there, weights copied
into its memory. Registered with an RPC tracker under a key, it is what `bench --rpc-tracker` measures;
without one, `session()` connects to it directly.

Emulated speed means nothing (every instruction is translated); what runs there is the Arm code itself,
and an instruction the named CPU lacks stops it with SIGILL, as on the board.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tvm import rpc

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.runtime.backend import RemoteSession, parse_tracker

from .sysroot import Sysroot

SERVER_MAIN = Path(__file__).with_name("rpc_server_main.py")  # run by the emulated Python
READY_LINE = "bind to"  # it prints "bind to HOST:PORT" once it listens
START_TIMEOUT_S = 300  # the emulated `import tvm` takes 20-60 s on two cores; more beside a busy suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatedDevice:
    """`with EmulatedDevice(sysroot, "cortex-a76") as device: device.session()` — the server stops, with
    every session process it forked, when the block ends."""

    def __init__(self, sysroot: Sysroot, cpu: str, tracker: str | None = None, key: str | None = None) -> None:
        if (tracker is None) != (key is None):
            raise ValueError("a tracker and a key go together")
        self.sysroot, self.cpu, self.tracker, self.key = sysroot, cpu, tracker, key
        self.port = free_port()
        self._scratch = tempfile.TemporaryDirectory(prefix="mobilevlm-emulated-rpc-")
        self._log = open(Path(self._scratch.name) / "server.log", "wb")  # open as long as the server
        self._proc: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(self, timeout_s: float = START_TIMEOUT_S) -> EmulatedDevice:
        """Start the server and wait until it listens (and, with a tracker, until the tracker lists it);
        on any failure nothing is left running."""
        try:
            if self.tracker:
                self._check_tracker()
            args = ["127.0.0.1", str(self.port)] + ([self.tracker, self.key] if self.tracker else [])
            self._proc = subprocess.Popen(
                self.sysroot.command(self.cpu, str(SERVER_MAIN), *args),
                env=self.sysroot.environment(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # one process group: the server and the sessions it forks
            )
            deadline = time.monotonic() + timeout_s
            self._wait("listen", lambda: READY_LINE in self.log, deadline)
            if self.tracker:
                self._wait(f"register with the tracker at {self.tracker}", self._registered, time.monotonic() + 60)
        except BaseException:
            self.close()
            raise
        return self

    def _wait(self, what: str, done, deadline: float) -> None:
        while not done():
            if self._proc.poll() is not None:
                raise MobileVLMError(f"the emulated RPC server exited ({self._proc.returncode}): {self.last_line()}")
            if time.monotonic() > deadline:
                raise MobileVLMError(f"the emulated RPC server did not {what} in time: {self.last_line()}")
            time.sleep(0.5)

    def _check_tracker(self, grace_s: float = 10) -> None:
        """Fail soon when nothing listens at the tracker's address (TVM would retry for a minute); a
        tracker started just before gets `grace_s` to come up."""
        host, port = parse_tracker(self.tracker)
        deadline = time.monotonic() + grace_s
        while True:
            try:
                socket.create_connection((host, port), timeout=5).close()
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise MobileVLMError(
                        f"--rpc-tracker {self.tracker}: no RPC tracker answers there ({err})"
                    ) from None
                time.sleep(0.5)

    def _registered(self) -> bool:
        host, port = parse_tracker(self.tracker)
        servers = rpc.connect_tracker(host, port).summary()["server_info"]
        return any(s["key"] == f"server:{self.key}" and s["addr"][1] == self.port for s in servers)

    def last_line(self) -> str:
        """The server's last log line (why it stopped)."""
        lines = [line for line in self.log.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def session(self) -> RemoteSession:
        """A session on this device, connected directly (not through the tracker). TVM's server serves
        one session at a time: a second one waits until the first is closed (dropped)."""
        try:
            session = rpc.connect("127.0.0.1", self.port, session_timeout=0)
        except (RuntimeError, OSError) as err:
            raise MobileVLMError(f"no session from the emulated RPC server: {first_line(err)}") from None
        return RemoteSession(session, f"qemu-aarch64 -cpu {self.cpu}", f"127.0.0.1:{self.port}")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()
        self._scratch.cleanup()

    def __enter__(self) -> EmulatedDevice:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()
