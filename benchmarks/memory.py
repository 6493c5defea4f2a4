"""Peak memory of a child process, sampled from /proc (Linux): resident total (VmHWM, which counts
mmap'd file pages such as a checkpoint read through mmap) and anonymous memory (what it allocated)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass
class Measured:
    seconds: float
    peak_rss_gib: float
    peak_anon_gib: float
    returncode: int
    output: str


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> Measured:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}

    def sample() -> None:
        while proc.poll() is None:
            for key in peaks:
                peaks[key] = max(peaks[key], _status_kib(proc.pid, key))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    sampler.join()
    return Measured(
        time.perf_counter() - started, peaks["VmHWM"] / 2**20, peaks["RssAnon"] / 2**20, proc.returncode, output
    )
