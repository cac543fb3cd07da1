"""Floors of a lookup's round trip on this host, without a replay (issue 15).

``PYTHONPATH=$PWD python scripts/diag/lookup_floor.py``

1. A ZeroMQ DEALER -> ROUTER echo between two Python processes (the directory's socket
   pattern, no directory code), and a raw TCP ping-pong (TCP_NODELAY), 3.5 kB each way.
2. A 100-key Lookup to an idle directory process (``python -m p2pkv.directory``, empty
   namespace) through ``DirectoryClient``.
Each alternates phases with every thread of both processes at the default policy and at
SCHED_FIFO (``bench/trace/probe.set_realtime``; needs CAP_SYS_NICE), one round trip every
10 ms, and prints p50/p90/p99/max per mode and the host's load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import zmq

from p2pkv.bench.report import pct
from p2pkv.bench.trace.probe import machine_load, set_realtime

PAYLOAD = b"x" * 3500


def _zmq_server(port_q) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        frames = s.recv_multipart()
        if frames[-1] == b"stop":
            break
        s.send_multipart(frames)


def _tcp_server(port_q) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port_q.put(ls.getsockname()[1])
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(65536)
        if not b or b == b"stop":
            break
        c.sendall(b)


def _phases(pids, round_trip, phases: int = 6, phase_s: float = 4.0) -> dict:
    res: dict[str, list[float]] = {"normal": [], "realtime": []}
    try:
        for phase in range(phases):
            mode = "normal" if phase % 2 == 0 else "realtime"
            for pid in pids:
                set_realtime(pid, mode == "realtime")
            end = time.monotonic() + phase_s
            while time.monotonic() < end:
                t = time.perf_counter()
                if round_trip():
                    res[mode].append(time.perf_counter() - t)
                time.sleep(0.01)
    finally:
        for pid in pids:
            set_realtime(pid, False)
    return res


def _print(kind: str, res: dict) -> None:
    for mode, v in res.items():
        if v:
            print(f"{kind} {mode}: n={len(v)} p50 {pct(v, .5) * 1e3:.3f} p90 "
                  f"{pct(v, .9) * 1e3:.3f} p99 {pct(v, .99) * 1e3:.3f} max {max(v) * 1e3:.2f} ms")


def echo(kind: str) -> None:
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_zmq_server if kind == "zmq" else _tcp_server, args=(q,))
    p.start()
    port = q.get(timeout=30)
    if kind == "zmq":
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(f"tcp://127.0.0.1:{port}")

        def rt() -> bool:
            s.send(PAYLOAD)
            return s.poll(5000) and bool(s.recv())
    else:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def rt() -> bool:
            s.sendall(PAYLOAD)
            n = 0
            while n < len(PAYLOAD):
                n += len(s.recv(65536))
            return True
    try:
        _print(kind, _phases((os.getpid(), p.pid), rt))
    finally:
        if kind == "zmq":
            s.send(b"stop")
            s.close(linger=0)
            ctx.term()
        else:
            s.sendall(b"stop")
            s.close()
        p.join(5)


def idle_directory() -> None:
    from p2pkv.directory.client import DirectoryClient
    from p2pkv.directory.protocol import LookupReply
    from p2pkv.keys import ChunkKey, Namespace
    from p2pkv.sim.processes import DirectoryProcess

    d = DirectoryProcess.start()
    c = DirectoryClient(d.endpoint)
    keys = [ChunkKey(i.to_bytes(32, "little")) for i in range(100)]
    try:
        _print("idle directory", _phases((os.getpid(), d.proc.pid), lambda: isinstance(
            c.wait_lookup(c.start_lookup(Namespace("n"), keys, 0.5), 0.5), LookupReply),
            phases=8, phase_s=5.0))
    finally:
        c.close()
        d.stop()


if __name__ == "__main__":
    print("load (1-min, CPU pressure %):", machine_load())
    echo("zmq")
    echo("tcp")
    idle_directory()
    print("load (1-min, CPU pressure %):", machine_load())
