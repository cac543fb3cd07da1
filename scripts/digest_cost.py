"""Experiment for issue 13's authenticated data plane: what a keyed chunk digest would cost
the TCP path. Pulls the same chunk over a raw socket, over our tcp path with its xxh3-64
digest, and over our tcp path with the puller hashing with BLAKE3 in keyed mode instead
(the digests then differ, which is ignored here: only the speed is measured), interleaved
rep by rep, against the holder of ``p2pkv bench transport``.

    python scripts/digest_cost.py SIZES_MIB REPS     e.g. 1,16,64 12
"""
import multiprocessing as mp
import socket
import statistics
import sys

import blake3
import numpy as np
import xxhash

from p2pkv.bench import transport as bt
from p2pkv.transport import stream
from p2pkv.transport.base import PullItem
from p2pkv.transport.choose import make_transport

KEY32 = b"k" * 32
class _B3:
    def __init__(self): self.h = blake3.blake3(key=KEY32)
    def update(self, v): self.h.update(v)
    def intdigest(self): return int.from_bytes(self.h.digest(8), "little")
class Shim:
    mode = "xxh3"
    def xxh3_64(self): return xxhash.xxh3_64() if Shim.mode == "xxh3" else _B3()
stream.xxhash = Shim()

def main(sizes_mib, reps):
    ctx = mp.get_context("spawn"); mine, theirs = ctx.Pipe()
    sizes = [s * bt.MiB for s in sizes_mib]
    holder = ctx.Process(target=bt._holder, args=(sizes, False, theirs), daemon=True); holder.start()
    addresses, raw_port = mine.recv()
    raw = socket.create_connection(("127.0.0.1", raw_port)); raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp = make_transport("tcp", bind_host="127.0.0.1")
    for size in sizes:
        dest = np.zeros(size, dtype=np.uint8); item = [PullItem(bt.KEY, (memoryview(dest),))]
        def pull(mode):
            Shim.mode = mode
            tcp.pull(addresses["shm", size], item, 30.0)
        cases = {"raw": lambda: bt._raw_pull(raw, size, dest), "tcp-xxh3": lambda: pull("xxh3"),
                 "tcp-blake3-keyed": lambda: pull("b3")}
        for f in cases.values(): f()
        got = {n: [] for n in cases}
        for _ in range(reps):
            for n, f in cases.items(): got[n] += bt._gbps(size, f, 1)
        med = {n: statistics.median(v) for n, v in got.items()}
        print(f"{size//bt.MiB:>3} MiB  raw {med['raw']:.2f} GB/s  tcp-xxh3 {med['tcp-xxh3']:.2f} ({med['tcp-xxh3']/med['raw']:.0%})"
              f"  tcp-blake3-keyed {med['tcp-blake3-keyed']:.2f} ({med['tcp-blake3-keyed']/med['raw']:.0%})", flush=True)
    mine.send("done"); holder.join(5)

def hash_only(nbytes: int = 64 << 20) -> None:
    """Each digest alone on one core, over one buffer and in 4 MiB updates (as stream.py)."""
    import time
    buf = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    def best(f):
        t = min((lambda t0: (f(), time.perf_counter() - t0)[1])(time.perf_counter())
                for _ in range(5))
        return nbytes / t / 1e9
    def stepped(h):
        for a in range(0, nbytes, stream.HASH_STEP):
            h.update(buf[a:a + stream.HASH_STEP])
        return h.digest()
    print(f"hash alone: xxh3-64 {best(lambda: xxhash.xxh3_64_intdigest(buf)):.2f} GB/s, "
          f"in steps {best(lambda: stepped(xxhash.xxh3_64())):.2f}; BLAKE3 keyed "
          f"{best(lambda: blake3.blake3(buf, key=KEY32).digest()):.2f} GB/s, in steps "
          f"{best(lambda: stepped(blake3.blake3(key=KEY32))):.2f}", flush=True)


if __name__ == "__main__":
    hash_only()
    main([int(s) for s in sys.argv[1].split(",")], int(sys.argv[2]))
