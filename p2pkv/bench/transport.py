"""``p2pkv bench transport``: each data-plane path next to its limit, same run, same bytes.

A holder process serves one chunk of each size (1, 4, 16, 64 MiB by default) through the
shm-capable transport, plus a raw-socket server that sends the same slab bytes with one
``sendall`` per request. The puller (this process) measures, interleaved rep by rep:

    tcp  (our pull over the socket)      vs  raw socket sendall / recv_into loop
    tcp-mac   (with a cluster secret: MACed headers, xxh3 digests)  vs  raw socket
    tcp-keyed (with a cluster secret and keyed chunk tags, as between hosts)  vs  raw
    tcp-sealed (chunk bytes AES-256-GCM encrypted: ``chunk_digest: sealed``)  vs  raw
    shm  (our pull from the shared slab) vs  memcpy (numpy copyto, same bytes, same dest)
    shm-keyed (with a cluster secret, keyed tags checked on the copy: ``chunk_digest:
              keyed``) vs  memcpy

    ucx-tcp (bytes over UCX's tcp)      vs  raw socket
    ucx-tcp-keyed (with a cluster secret and keyed tags, as between hosts) vs  raw socket
    ucx  (UCX, all its transports: cma/shm on one host) vs  memcpy

and prints GB/s and ratios. Goals: tcp (and tcp-keyed) >= 90 % of raw socket, shm >= 50 % of
memcpy. The
UCX rows need ucxx (``pip install 'p2pkv[ucx]'``); without it they say so.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from p2pkv.bench.report import Column, table
from p2pkv.keys import ChunkKey
from p2pkv.secret import ClusterSecret
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.choose import make_transport

MiB = 1 << 20
KEY = ChunkKey(b"bench-transport-chunk-key-000000")
_REQ = struct.Struct("<Q")
SECRET = ClusterSecret(b"bench-transport-cluster-secret!!")  # the holder's and pullers' own


def _chunk(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


def _raw_server(sock: socket.socket, views: dict[int, memoryview]) -> None:
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while len(req := conn.recv(_REQ.size, socket.MSG_WAITALL)) == _REQ.size:
                conn.sendall(views[_REQ.unpack(req)[0]])


UCX_PATHS = {"ucx-tcp": {"TLS": "tcp"}, "ucx": {}}  # path -> UCX options


def _ucx(config: dict[str, str], secret: ClusterSecret | None = None, digest: str = "auto"):
    return make_transport("ucx", bind_host="127.0.0.1", ucx_config=config, secret=secret,
                          chunk_digest=digest)  # type: ignore[arg-type]


def _holder(sizes: list[int], with_ucx: bool, pipe) -> None:
    transports, addresses, views = [], {}, {}
    for size in sizes:
        makers = {"shm": lambda: make_transport("shm", bind_host="127.0.0.1"),
                  "auth": lambda: make_transport("tcp", bind_host="127.0.0.1", secret=SECRET),
                  "shm-auth": lambda: make_transport("shm", bind_host="127.0.0.1",
                                                     secret=SECRET)}
        if with_ucx:
            makers.update({p: (lambda c=c: _ucx(c)) for p, c in UCX_PATHS.items()})
            makers["ucx-tcp-auth"] = lambda: _ucx(UCX_PATHS["ucx-tcp"], SECRET)
        for path, make in makers.items():
            t = make()
            store = t.create_store(size, 1)
            w = store.reserve(KEY)
            np.frombuffer(w.view, dtype=np.uint8)[:] = _chunk(size)
            store.commit(w)
            addresses[path, size] = t.serve(store)
            if path == "shm":
                views[size] = store.slot_view(w.index)
            transports.append(t)
    raw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_server, args=(raw, views), daemon=True).start()
    pipe.send((addresses, raw.getsockname()[1]))
    pipe.recv()  # until the puller is done


def _raw_pull(sock: socket.socket, size: int, dest: np.ndarray) -> None:
    sock.sendall(_REQ.pack(size))
    view, got = memoryview(dest), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise ConnectionError("raw server closed")
        got += n


def _gbps(size: int, fn: Callable[[], None], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(size / (time.perf_counter() - t0) / 1e9)
    return out


def run(sizes_mib: list[int], budget_mib: int, with_ucx: bool
        ) -> list[tuple[int, str, float, str, float]]:
    sizes = [s * MiB for s in sizes_mib]
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    holder = ctx.Process(target=_holder, args=(sizes, with_ucx, theirs), daemon=True)
    holder.start()
    rows = []
    try:
        addresses, raw_port = mine.recv()
        raw = socket.create_connection(("127.0.0.1", raw_port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp, shm = make_transport("tcp", bind_host="127.0.0.1"), make_transport(
            "shm", bind_host="127.0.0.1")
        mac = make_transport("tcp", bind_host="127.0.0.1", secret=SECRET, chunk_digest="xxh3")
        keyed = make_transport("tcp", bind_host="127.0.0.1", secret=SECRET,
                               chunk_digest="keyed")
        sealed = make_transport("tcp", bind_host="127.0.0.1", secret=SECRET,
                                chunk_digest="sealed")
        shm_keyed = make_transport("shm", bind_host="127.0.0.1", secret=SECRET,
                                   chunk_digest="keyed")
        ucx = {p: _ucx(c) for p, c in UCX_PATHS.items()} if with_ucx else {}
        if with_ucx:
            ucx["ucx-tcp-keyed"] = _ucx(UCX_PATHS["ucx-tcp"], SECRET, "keyed")
        ucx_at = {"ucx-tcp": "ucx-tcp", "ucx": "ucx", "ucx-tcp-keyed": "ucx-tcp-auth"}
        for size in sizes:
            dest = np.zeros(size, dtype=np.uint8)
            src = _chunk(size)
            item = [PullItem(KEY, (memoryview(dest),))]
            reps = max(5, min(40, budget_mib * MiB // size))

            def pull(t=None, path="shm", item=item, size=size):
                (r,) = t.pull(addresses[path, size], item, 30.0)
                if r.outcome is not Outcome.OK:
                    raise RuntimeError(f"bench pull failed: {r}")

            cases = {"tcp": lambda: pull(tcp), "raw": lambda: _raw_pull(raw, size, dest),
                     "tcp-mac": lambda: pull(mac, "auth"),
                     "tcp-keyed": lambda: pull(keyed, "auth"),
                     "tcp-sealed": lambda: pull(sealed, "auth"),
                     "shm": lambda: pull(shm), "memcpy": lambda: np.copyto(dest, src),
                     "shm-keyed": lambda: pull(shm_keyed, "shm-auth")}
            for path, t in ucx.items():
                cases[path] = lambda t=t, path=path: pull(t, ucx_at[path])
            for fn in cases.values():  # warm up: connect, map, fault the pages in
                fn()
            got: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(reps):  # interleaved, so that noise hits every path alike
                for name, fn in cases.items():
                    got[name] += _gbps(size, fn, 1)
            assert np.array_equal(dest, src)
            med = {name: statistics.median(v) for name, v in got.items()}
            rows.append((size, "tcp", med["tcp"], "raw socket", med["raw"]))
            rows.append((size, "tcp-mac", med["tcp-mac"], "raw socket", med["raw"]))
            rows.append((size, "tcp-keyed", med["tcp-keyed"], "raw socket", med["raw"]))
            rows.append((size, "tcp-sealed", med["tcp-sealed"], "raw socket", med["raw"]))
            rows.append((size, "shm", med["shm"], "memcpy", med["memcpy"]))
            rows.append((size, "shm-keyed", med["shm-keyed"], "memcpy", med["memcpy"]))
            if ucx:
                rows.append((size, "ucx-tcp", med["ucx-tcp"], "raw socket", med["raw"]))
                rows.append((size, "ucx-tcp-keyed", med["ucx-tcp-keyed"], "raw socket",
                             med["raw"]))
                rows.append((size, "ucx", med["ucx"], "memcpy", med["memcpy"]))
            assert tcp.counters.shm == 0 and shm.counters.tcp == 0
            assert keyed.pool.idle()[0].keyed and not mac.pool.idle()[0].keyed
            assert sealed.pool.idle()[0].sealed and not keyed.pool.idle()[0].sealed
            assert shm_keyed.pool.idle()[0].keyed and shm_keyed.counters.tcp == 0
            assert all(t.counters.tcp == t.counters.shm == 0 for t in ucx.values())
        for t in [tcp, mac, keyed, sealed, shm, shm_keyed, *ucx.values()]:
            t.close()
        raw.close()
    finally:
        mine.send("done")
        holder.join(5)
        if holder.is_alive():
            holder.kill()
    return rows


# the UCX rows have no goal: they show when UCX pays
GOALS = {"tcp": 0.90, "tcp-keyed": 0.90, "shm": 0.50}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,4,16,64", help="chunk sizes in MiB")
    parser.add_argument("--budget-mib", type=int, default=512,
                        help="bytes moved per path and size (sets the number of reps)")


def _goal(path: str, ratio: float) -> str:
    if path not in GOALS:
        return "-"
    return f">= {GOALS[path]:.0%} " + ("met" if ratio >= GOALS[path] else "MISSED")


def main(args: argparse.Namespace) -> int:
    from p2pkv.transport.ucx import ucx_unavailable_reason

    t0 = time.monotonic()
    missing = ucx_unavailable_reason()
    rows = run([int(s) for s in args.sizes.split(",")], args.budget_mib, not missing)
    print(table([Column("chunk", 8), Column("path", 13, align="<"), Column("GB/s", 6, ".2f"),
                 Column("limit", 11, align="<"), Column("GB/s", 6, ".2f"),
                 Column("ratio", 6, ".0%"), Column("goal", align="<")],
                ([f"{size // MiB} MiB", path, ours, limit, base, ours / base,
                  _goal(path, ours / base)] for size, path, ours, limit, base in rows),
                sep="  "))
    if missing:
        print(f"ucx rows: none ({missing})")
    print(f"(medians of interleaved reps, two processes on loopback; "
          f"{time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="p2pkv bench transport")
    add_args(p)
    raise SystemExit(main(p.parse_args()))
