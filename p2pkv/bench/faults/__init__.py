"""``p2pkv bench faults``: the fault suite (issue 13), real processes on loopback, a table.

The data-plane cases: a holder process serves seeded chunks over TCP while this process
pulls them and checks every byte, and for each case the holder is put under one fault. Per
case: pulls sent ("sent"; for the router's cases: requests), pulls that came back byte-exact
("correct"; "caught": of those, pulls of a corrupted chunk refused, as they must be), pulls
that failed (vLLM would recompute those blocks: slower, never wrong), pulls that came back
"OK" with wrong bytes (the figure that must be 0), the slowest pull, the time until the
holder is back to its baseline file descriptors after the fault stops, and the holder's RSS
(the router's, for its cases) before and after.

    baseline          no fault
    flood             600 sockets that never handshake, from another loopback address
    malformed         10,000 malformed frames: bad handshakes and garbage after good ones
                      (pulls go on until all of them were sent)
    corrupt           a byte flipped in one stored chunk (pulls of it must fail)
    corrupt-keyed     the same with a cluster secret and keyed chunk tags (as between
                      hosts: the holder checks its stored digest before it tags a chunk)

The router's cases (a flood on its port, malformed requests, a 1 GB body, under 16
concurrent clients: ``faults/router.py``) and the directory's (a flood on its port,
malformed frames, a member forging the holder's registration, while lookups run:
``faults/directory.py``) follow. With ``--vllm``, the cases of the issue that need vLLM
(64 clients through the router over 2 vLLM instances, a holder SIGSTOPped and one SIGKILLed,
the directory restarted under that load: ``faults/vllm.py``) run last (``--only-vllm``:
only those); without it they are listed as not run: no figures are made up for them. They
start vLLM: run them under the machine's vLLM lock.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable

import numpy as np

from p2pkv.bench.faults.row import Row, fds, rss_mib
from p2pkv.keys import ChunkKey
from p2pkv.secret import ClusterSecret
from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.choose import make_transport

CHUNK = 256 << 10
CHUNKS = 8
PULL_TIMEOUT_S = 5.0
SECRET = ClusterSecret(b"bench-faults-cluster-secret-0123")  # the keyed case's own
NOT_RUN = {
    "router load (64 clients, 60 s, 2 vLLM)": "needs vLLM instances",
    "holder SIGKILL / SIGSTOP under load": "needs vLLM instances",
    "directory killed and restarted": "needs the directory and vLLM",
}


def _key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(4, "little") * 8)


def _bytes(i: int) -> np.ndarray:
    return np.random.default_rng([13, i]).integers(0, 256, CHUNK, dtype=np.uint8)


def _transport(keyed: bool):
    if not keyed:
        return make_transport("tcp", bind_host="127.0.0.1")
    return make_transport("tcp", bind_host="127.0.0.1", secret=SECRET, chunk_digest="keyed")


def _holder(corrupt: int, keyed: bool, pipe) -> None:
    transport = _transport(keyed)
    store = transport.create_store(CHUNK, CHUNKS)
    for i in range(CHUNKS):
        w = store.reserve(_key(i))
        assert w is not None
        np.frombuffer(w.view, dtype=np.uint8)[:] = _bytes(i)
        store.commit(w)
    if corrupt >= 0:
        p = store.pin(_key(corrupt))
        assert p is not None
        store.slot_view(p.index)[CHUNK // 2] ^= 0xFF
        store.unpin(p)
    pipe.send((transport.serve(store), os.getpid()))
    pipe.recv()  # until told to stop
    transport.close()


def _flooder(address: str, n: int, source: str, stop, count) -> None:
    host, port = address.rsplit(":", 1)
    sel = selectors.DefaultSelector()

    def open_one() -> None:
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        s.connect_ex((host, int(port)))
        sel.register(s, selectors.EVENT_READ)

    for _ in range(n):
        open_one()
    count.value = n
    while not stop.is_set():
        for key, _ in sel.select(0.05):
            s = key.fileobj
            try:
                if s.recv(4096):  # type: ignore[union-attr]
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
            open_one()
            count.value += 1


def _malformed(address: str, frames: int, stop, count) -> None:
    """``frames`` malformed frames: half bad handshakes, half garbage requests after a
    good handshake (this holder has no secret: a zero MAC is a good one)."""
    host, port = address.rsplit(":", 1)
    garbage = [b"\xff\xff\xff\xff", struct.pack("<I", 5) + b"hello",
               wire.encode_request(wire.Release([(0, 1)])), b"GET / HTTP/1.0\r\n\r\n"]
    for i in range(frames):
        if stop.is_set():
            return
        try:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.settimeout(2)
                s.recv(wire.HELLO_BYTES)
                if i % 2:
                    s.sendall(secrets.token_bytes(wire.PROOF_BYTES))
                else:
                    s.sendall(wire.pack_proof(b"n" * wire.NONCE_BYTES, bytes(wire.MAC_BYTES))
                              + garbage[i % len(garbage)])
                count.value += 1
                s.recv(4096)
        except OSError:
            pass


def _pull_loop(address: str, seconds: float, row: Row, expect_bad: int = -1,
               keyed: bool = False) -> None:
    """Pull every chunk, one pull each, over and over for ``seconds``; a new connection
    every fourth round."""
    end = time.monotonic() + seconds
    rounds = 0
    pooled = _transport(keyed)
    try:
        while time.monotonic() < end:
            fresh = _transport(keyed) if rounds % 4 == 0 else None
            t = fresh or pooled
            for i in range(CHUNKS):
                dest = np.zeros(CHUNK, dtype=np.uint8)
                t0 = time.monotonic()
                (r,) = t.pull(address, [PullItem(_key(i), (memoryview(dest),))],
                              PULL_TIMEOUT_S)
                row.slowest_ms = max(row.slowest_ms, (time.monotonic() - t0) * 1000)
                row.sent += 1
                exact = np.array_equal(dest, _bytes(i))
                if r.outcome is Outcome.OK:
                    row.correct += exact
                    row.wrong += not exact
                elif i == expect_bad:
                    row.correct += 1  # the corruption was caught: the right answer
                    row.caught += 1
                else:
                    row.failed += 1
            if fresh is not None:
                fresh.close()
            rounds += 1
    finally:
        pooled.close()


def _case(name: str, seconds: float,
          fault: Callable[[str, object, object], mp.Process] | None, unit: str = "",
          corrupt: int = -1, finish: bool = False, keyed: bool = False) -> Row:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    holder = ctx.Process(target=_holder, args=(corrupt, keyed, theirs), daemon=True)
    holder.start()
    row = Row(name)
    try:
        address, pid = mine.recv()
        _pull_loop(address, 0.5, Row("warm-up"), keyed=keyed)
        time.sleep(0.5)
        baseline_fds, row.rss_before = fds(pid), rss_mib(pid)
        stop, count = ctx.Event(), ctx.Value("q", 0)
        proc = fault(address, stop, count) if fault is not None else None
        if proc is not None:
            proc.start()
            time.sleep(1.0)  # the fault is on before the pulls start
        _pull_loop(address, seconds, row, expect_bad=corrupt, keyed=keyed)
        if proc is not None:
            if finish:  # the fault has a fixed size: pull on until all of it was sent
                t_end = time.monotonic() + 300
                while proc.is_alive() and time.monotonic() < t_end:
                    _pull_loop(address, 1.0, row, expect_bad=corrupt, keyed=keyed)
            stop.set()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
            row.fault = f"{count.value} {unit}"
        if corrupt >= 0:
            row.fault = f"chunk {corrupt} corrupted"
        t0 = time.monotonic()
        while fds(pid) > baseline_fds + 4 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        row.recover_s = time.monotonic() - t0 if fds(pid) <= baseline_fds + 4 else None
        row.rss_after = rss_mib(pid)
        if not holder.is_alive():
            row.failed += 1  # counted as a failure of the case: the holder died
    finally:
        mine.send("stop")
        holder.join(5)
        if holder.is_alive():
            holder.kill()
    return row


def run(seconds: float, router: bool = True, directory: bool = True,
        data_plane: bool = True) -> list[Row]:
    ctx = mp.get_context("spawn")
    if not data_plane:
        return []
    rows = [
        _case("baseline", seconds, None),
        _case("flood", seconds, lambda a, stop, n: ctx.Process(
            target=_flooder, args=(a, 600, "127.0.0.2", stop, n), daemon=True),
            "silent sockets opened"),
        _case("malformed", seconds, lambda a, stop, n: ctx.Process(
            target=_malformed, args=(a, 10_000, stop, n), daemon=True), "malformed frames",
            finish=True),
        _case("corrupt", seconds, None, corrupt=3),
        _case("corrupt-keyed", seconds, None, corrupt=3, keyed=True),
    ]
    if router:
        from p2pkv.bench.faults import router as faults_router

        rows += faults_router.run(seconds)
    if directory:
        from p2pkv.bench.faults import directory as faults_directory

        rows += faults_directory.run(seconds)
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="pulling (or requesting) time per case, with its fault on")
    parser.add_argument("--no-router", action="store_true", help="skip the router's cases")
    parser.add_argument("--no-directory", action="store_true",
                        help="skip the directory's cases")
    parser.add_argument("--vllm", action="store_true",
                        help="also run the cases on real vLLM (2 instances, the router)")
    parser.add_argument("--only-vllm", action="store_true", help="only the vLLM cases")
    parser.add_argument("--vllm-load-s", type=float, default=60.0,
                        help="the vLLM load case's length")
    parser.add_argument("--vllm-fault-s", type=float, default=20.0,
                        help="each vLLM fault case's length")
    parser.add_argument("--vllm-fault-after-s", type=float, default=0.3,
                        help="when the fault comes in each vLLM fault case")
    parser.add_argument("--clients", type=int, default=64,
                        help="concurrent clients in the vLLM cases")
    parser.add_argument("--cases", default=None, metavar="NAMES",
                        help="only these vLLM cases, comma-separated, run in their usual order "
                             "on one cluster: load, SIGSTOP, directory, SIGKILL (default: all; "
                             "splits a run that would exceed a 10-minute window)")


def main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    only = args.only_vllm
    rows = run(args.seconds, router=not (args.no_router or only),
               directory=not (args.no_directory or only), data_plane=not only)
    notes: list[str] = []
    if args.vllm or only:
        from p2pkv.bench.faults import vllm as faults_vllm

        vllm_rows, notes = faults_vllm.run(args.vllm_load_s, args.vllm_fault_s, args.clients,
                                           args.vllm_fault_after_s,
                                           cases=faults_vllm.select_cases(args.cases))
        rows += vllm_rows
    print(f"{'case':<13} {'sent':>6} {'correct':>7} {'caught':>6} {'failed':>6} "
          f"{'wrong':>5} {'slowest':>9} {'recover':>8} {'RSS before':>10} {'after':>7}  fault")
    for r in rows:
        recover = f"{r.recover_s:.1f} s" if r.recover_s is not None else "never"
        print(f"{r.case:<13} {r.sent:>6} {r.correct:>7} {r.caught:>6} {r.failed:>6} "
              f"{r.wrong:>5} {r.slowest_ms:>6.0f} ms {recover:>8} {r.rss_before:>6.0f} MiB "
              f"{r.rss_after:>4.0f} MiB  {r.fault}")
    if not (args.vllm or only):
        for case, why in NOT_RUN.items():
            print(f"not run: {case} ({why})")
    else:
        print(f"(vLLM cases: {args.clients} clients through the router over instances A and "
              f"B, load {args.vllm_load_s:g} s, each fault case {args.vllm_fault_s:g} s; "
              "RSS: A's process group)")
    for note in notes:
        print(f"note: {note}")
    if not only:
        print(f"(data plane: {CHUNKS} chunks of {CHUNK >> 10} KiB, pull deadline "
              f"{PULL_TIMEOUT_S:g} s, the holder with the default ServerLimits)")
    print(f"({time.monotonic() - t0:.0f} s in all)")
    bad = any(r.wrong or r.failed for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="p2pkv bench faults")
    add_args(p)
    raise SystemExit(main(p.parse_args()))
