"""Experiment for issue 13's keyed chunk digest: what each candidate costs the TCP path, side by
side in one run. Pulls the same chunk over a raw socket, over our tcp path with its xxh3-64
digest, and over our tcp path with the puller hashing the bytes with another digest instead
(the digests then differ from the holder's, which is ignored here: only the puller's speed is
measured; the holder side is the same for every candidate that it can keep per chunk),
interleaved rep by rep, against the holder of ``p2pkv bench transport``. Candidates:

    blake3           BLAKE3 (what a keyed tag is computed over), 4 MiB updates, inline
    blake3-1m        the same in 1 MiB updates (each hashed while it is still in L2/L3)
    blake3-mt        BLAKE3 with max_threads=AUTO (its own worker threads per update)
    blake3-pipe      inline receive, hashing on a second thread (chunk i while i+1 lands)
    poly1305         Poly1305 (``cryptography``, OpenSSL), 4 MiB updates, inline
    poly1305-pipe    Poly1305 on a second thread
    gmac             AES-GCM's GHASH over the bytes as associated data (OpenSSL), inline
    gmac-pipe        GMAC on a second thread
    aes-gcm          AES-256-GCM over the bytes as they land (what decrypting an encrypted
                     stream would cost the puller; the holder would pay as much per pull)

    python scripts/digest_cost.py SIZES_MIB REPS [CANDIDATES]   e.g. 4,16,64 12
"""
import multiprocessing as mp
import queue
import socket
import statistics
import sys
import threading
import time

import blake3
import numpy as np
import xxhash
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

from p2pkv.bench import transport as bt
from p2pkv.transport import stream
from p2pkv.transport.base import PullItem
from p2pkv.transport.choose import make_transport
from p2pkv.transport.sockio import recv_views

KEY32 = b"k" * 32


class _Digest:
    def __init__(self, update, final):
        self.update, self._final = update, final

    def intdigest(self):
        return int.from_bytes(self._final()[:8], "little")


def _b3(mt=False):
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if mt else blake3.blake3()
    return _Digest(h.update, h.digest)


def _poly():
    h = Poly1305(KEY32)
    return _Digest(h.update, h.finalize)


def _gmac():
    e = Cipher(algorithms.AES(KEY32), modes.GCM(b"n" * 12)).encryptor()
    return _Digest(e.authenticate_additional_data, lambda: (e.finalize(), e.tag)[1])


def _aes_gcm():
    e = Cipher(algorithms.AES(KEY32), modes.GCM(b"n" * 12)).encryptor()
    out = bytearray((4 << 20) + 16)

    def update(v):
        e.update_into(v, out)
    return _Digest(update, lambda: (e.finalize(), e.tag)[1])


MAKERS = {"xxh3": xxhash.xxh3_64, "blake3": _b3, "blake3-1m": _b3,
          "blake3-mt": lambda: _b3(True), "blake3-pipe": _b3, "poly1305": _poly,
          "poly1305-pipe": _poly, "gmac": _gmac, "gmac-pipe": _gmac, "aes-gcm": _aes_gcm}
_inline = stream.recv_hashed


def _pipelined(sock, dest, deadline, h):
    """Receive step j+1 while a second thread hashes step j."""
    work: queue.SimpleQueue = queue.SimpleQueue()

    def hasher():
        while (group := work.get()) is not None:
            for v in group:
                h.update(v)
    t = threading.Thread(target=hasher)
    t.start()
    try:
        for group in stream._groups(dest, stream.HASH_STEP):
            recv_views(sock, group, deadline)
            work.put(group)
    finally:
        work.put(None)
        t.join()
    return h


class Shim:
    mode = "xxh3"

    def xxh3_64(self):
        return MAKERS[Shim.mode]()


def _recv(sock, dest, deadline, h):
    stream.HASH_STEP = (1 << 20) if Shim.mode.endswith("-1m") else (4 << 20)
    return (_pipelined if Shim.mode.endswith("-pipe") else _inline)(sock, dest, deadline, h)


stream.xxhash = Shim()
stream.recv_hashed = _recv


def main(sizes_mib, reps, names):
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    sizes = [s * bt.MiB for s in sizes_mib]
    holder = ctx.Process(target=bt._holder, args=(sizes, False, theirs), daemon=True)
    holder.start()
    addresses, raw_port = mine.recv()
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp = make_transport("tcp", bind_host="127.0.0.1")
    for size in sizes:
        dest = np.zeros(size, dtype=np.uint8)
        item = [PullItem(bt.KEY, (memoryview(dest),))]

        def pull(mode, item=item, size=size):
            Shim.mode = mode
            tcp.pull(addresses["shm", size], item, 30.0)
        cases = {"raw": lambda: bt._raw_pull(raw, size, dest)}
        cases.update({n: (lambda n=n: pull(n)) for n in names})
        for f in cases.values():
            f()
        got = {n: [] for n in cases}
        for _ in range(reps):
            for n, f in cases.items():
                got[n] += bt._gbps(size, f, 1)
        med = {n: statistics.median(v) for n, v in got.items()}
        print(f"{size // bt.MiB:>3} MiB  raw {med['raw']:.2f} GB/s  " + "  ".join(
            f"{n} {med[n]:.2f} ({med[n] / med['raw']:.0%})" for n in names), flush=True)
    mine.send("done")
    holder.join(5)


def hash_only(nbytes: int = 64 << 20) -> None:
    """Each digest alone on one core, over one buffer in 4 MiB updates (as stream.py)."""
    buf = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))

    def best(mk):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            h = mk()
            for a in range(0, nbytes, 4 << 20):
                h.update(buf[a:a + (4 << 20)])
            h.intdigest()
            ts.append(time.perf_counter() - t0)
        return nbytes / min(ts) / 1e9
    print("hash alone (GB/s): " + ", ".join(
        f"{n} {best(MAKERS[n]):.2f}" for n in ("xxh3", "blake3", "blake3-mt", "poly1305",
                                               "gmac", "aes-gcm")), flush=True)


if __name__ == "__main__":
    hash_only()
    main([int(s) for s in sys.argv[1].split(",")], int(sys.argv[2]),
         sys.argv[3].split(",") if len(sys.argv) > 3 else
         ["xxh3", "blake3", "blake3-1m", "blake3-mt", "blake3-pipe", "poly1305",
          "poly1305-pipe", "gmac", "gmac-pipe", "aes-gcm"])
