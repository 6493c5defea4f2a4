"""TVM's RPC server loop for the emulated Python: `python3.11 rpc_server_main.py HOST PORT [TRACKER KEY]`.

Run by the sysroot's AArch64 Python (it imports TVM only, none of this package). `python -m
tvm.exec.rpc_server` serves from a helper process's thread and forks each session from that thread;
under qemu-user a fork from a threaded guest now and then leaves the child deadlocked (seen: a session
process that never ran). Here the same loop (TVM 0.27's `tvm.rpc.server._listen_loop`) runs on the main
and only Python thread, so each session is forked from a single-threaded process.
"""

import socket
import sys

from tvm.rpc import server


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    tracker, key = (sys.argv[3], sys.argv[4]) if len(sys.argv) == 5 else (None, "")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1)
    print(f"bind to {host}:{port}", flush=True)
    tracker_addr = None
    if tracker:
        tracker_host, _, tracker_port = tracker.rpartition(":")
        tracker_addr = (tracker_host, int(tracker_port))
    server._listen_loop(sock, port, key, tracker_addr, None, None)


if __name__ == "__main__":
    main()
