"""The directory's cases of ``p2pkv bench faults``: a real directory process; a holder
registered with it (a ``DirectoryClient`` keeping its lease, as a worker does) has published
a set of keys; a looker asks ``Lookup`` for them in a loop ("correct": the holder and the
whole run came back within the connector's lookup deadline) while the directory is put under
one fault:

    d-flood     600 TCP sockets to its port that never send a byte, from 127.0.0.2
    d-malform   10,000 malformed frames from a DEALER (garbage, wrong versions, bad types)
    d-forge     another connection registers the holder's id with a higher epoch and its
                own address, publishes an empty reset, reports and unregisters it, in a loop

Used by :mod:`p2pkv.bench.faults` (which prints the table).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from p2pkv import heaptrim
from p2pkv.bench.faults.row import Row, hold_silent_sockets, rss_mib

LOOKUP_DEADLINE_S = 0.25  # the connector's default lookup_timeout_s
NS = "bench-faults"
HOLDER = "holder"
ADDRESS = "127.0.0.1:7001"


def _keys() -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(64)]


def _start_directory(tmp: Path) -> tuple[subprocess.Popen, str]:
    ready = tmp / "directory.ready"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "p2pkv.directory", "--bind",
                             "tcp://127.0.0.1:0", "--ready-file", str(ready)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the directory did not start")
        time.sleep(0.02)
    return proc, ready.read_text().strip()


def _flood(endpoint: str, stop, count) -> None:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    hold_silent_sockets(host, int(port), stop, count)


def _malformed(endpoint: str, stop, count) -> None:
    import zmq

    from p2pkv.directory import protocol
    from p2pkv.directory.protocol import Stats

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    frames = [b"\xc1\xff garbage", protocol.encode(Stats(v=99)), b"\x81\xa1t\xa3reg",
              b"\x00" * 1000, b"\x92\x01\x02"]
    for i in range(10_000):
        if stop.is_set():
            break
        sock.send(frames[i % len(frames)])
        count.value += 1
        while sock.poll(0):
            sock.recv()
    sock.close()
    ctx.term()


def _forge(endpoint: str, stop, count) -> None:
    import zmq

    from p2pkv.directory import protocol
    from p2pkv.directory.protocol import Publish, Register, Report, Unregister
    from p2pkv.keys import InstanceId, Namespace

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    me, ns = InstanceId(HOLDER), Namespace(NS)
    while not stop.is_set():
        epoch = time.time_ns() + 10**9
        for msg in (Register(instance=me, epoch=epoch, namespace=ns, address="127.0.0.1:666"),
                    Publish(instance=me, namespace=ns, added=[], removed=[], reset=True,
                            seq=1, epoch=epoch),
                    Report(instance=me, counters={"forged": 1}, epoch=epoch),
                    Unregister(instance=me, epoch=epoch)):
            sock.send(protocol.encode(msg))
            count.value += 1
        while sock.poll(0):
            sock.recv()
        time.sleep(0.005)
    sock.close()
    ctx.term()


def _look(endpoint: str, seconds: float, row: Row) -> None:
    from p2pkv.directory.client import DirectoryClient
    from p2pkv.directory.protocol import LookupReply
    from p2pkv.directory.protocol import Lookup
    from p2pkv.keys import ChunkKey, Namespace

    keys = [ChunkKey(k) for k in _keys()]
    client = DirectoryClient(endpoint)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            reply = client.call(Lookup(namespace=Namespace(NS), keys=keys), LOOKUP_DEADLINE_S)
            elapsed = time.monotonic() - t0
            row.sent += 1
            row.slowest_ms = max(row.slowest_ms, elapsed * 1000)
            good = (isinstance(reply, LookupReply) and elapsed <= LOOKUP_DEADLINE_S and
                    [(h.instance, h.address, h.run) for h in reply.holders]
                    == [(HOLDER, ADDRESS, len(keys))])
            row.correct += good
            row.failed += not good
    finally:
        client.close()


def case(name: str, seconds: float, fault: Callable | None,
         describe: Callable[[int], str] = lambda n: "-") -> Row:
    from p2pkv.directory.client import DirectoryClient, RegState, Registration
    from p2pkv.keys import ChunkKey, InstanceId, Namespace

    ctx = mp.get_context("spawn")
    row = Row(name)
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = _start_directory(Path(tmp))
        holder = DirectoryClient(endpoint)
        try:
            holder.register(Registration(InstanceId(HOLDER), time.time_ns(), Namespace(NS),
                                         ADDRESS), wait_connected_s=5)
            holder.publish([ChunkKey(k) for k in _keys()])
            deadline = time.monotonic() + 10
            while holder.state is not RegState.REGISTERED and time.monotonic() < deadline:
                time.sleep(0.01)
            _look(endpoint, 0.5, Row("warm-up"))
            row.rss_before = rss_mib(proc.pid)
            stop, count = ctx.Event(), ctx.Value("q", 0)
            fault_proc = ctx.Process(target=fault, args=(endpoint, stop, count), daemon=True) \
                if fault else None
            if fault_proc is not None:
                fault_proc.start()
                time.sleep(1.0)
            _look(endpoint, seconds, row)
            if fault_proc is not None:
                t_end = time.monotonic() + 300
                while fault is _malformed and fault_proc.is_alive() and \
                        time.monotonic() < t_end:
                    _look(endpoint, 1.0, row)
                stop.set()
                fault_proc.join(5)
                if fault_proc.is_alive():
                    fault_proc.kill()
                row.fault = describe(count.value)
            time.sleep(0.5 + heaptrim.INTERVAL_S)  # the directory's heap trimmed since
            row.rss_after = rss_mib(proc.pid)
            row.recover_s = 0.0 if proc.poll() is None else None
        finally:
            holder.close()
            proc.terminate()
            proc.wait(10)
    return row


def run(seconds: float) -> list[Row]:
    return [case("d-baseline", seconds, None),
            case("d-flood", seconds, _flood, lambda n: f"{n} silent sockets held"),
            case("d-malform", seconds, _malformed, lambda n: f"{n} malformed frames"),
            case("d-forge", seconds, _forge, lambda n: f"{n} forged messages")]
