"""Remote devices through TVM RPC, as Android's TVM RPC app and Jetsons use: a tracker hands out a
session to a device registered under a key; the library is uploaded and loaded there, weights are
copied into its memory, and the engine drives the run from here (each call is a round trip)."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import rpc

from .errors import MobileVLMError, first_line


class RemoteSession:
    def __init__(self, session: rpc.RPCSession, tracker: str, key: str):
        self.session, self.tracker, self.key = session, tracker, key
        self._functions: dict[str, object] = {}

    def load_library(self, path: Path) -> tvm.runtime.Module:
        self.session.upload(str(path), path.name)
        return self.session.load_module(path.name)

    def device(self, kind: str, index: int = 0) -> tvm.runtime.Device:
        local = tvm.device(kind, index)
        return self.session.device(local.dlpack_device_type(), local.index)

    def function(self, name: str):
        """A global function on the device, looked up once (each lookup is a round trip)."""
        if name not in self._functions:
            self._functions[name] = self.session.get_function(name)
        return self._functions[name]

    def environment(self) -> dict:
        """What this side can learn of the remote machine (the RPC server runs no Python of ours)."""
        return {"cpu": None, "cores": None, "rpc_tracker": self.tracker, "rpc_key": self.key}

    def peak_rss_mib(self) -> None:
        return None  # not observable through RPC


def connect(tracker: str, key: str, timeout_s: int = 60) -> RemoteSession:
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise MobileVLMError(f"--rpc-tracker {tracker!r}: expected HOST:PORT")
    try:
        client = rpc.connect_tracker(host, int(port))
        session = client.request(key, priority=1, session_timeout=0, max_retry=max(1, timeout_s // 5))
    except (RuntimeError, OSError, TimeoutError) as err:
        raise MobileVLMError(f"no device under key {key!r} from the RPC tracker at {tracker} ({first_line(err)})") from None
    return RemoteSession(session, tracker, key)
