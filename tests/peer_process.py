"""A stand-alone data-plane peer for transport tests and benchmarks: fills a store with seeded
random chunks, serves it, writes its address to a ready file, and runs until killed.

    python -m tests.peer_process READY_FILE CHUNK_BYTES NUM_CHUNKS SEED [KIND]

KIND is tcp (default) or shm. Test hooks, from the environment (only this script reads them):
P2PKV_TEST_SECRET (the cluster secret), P2PKV_TEST_CORRUPT=i (flip a byte of chunk i after
it is committed, so its digest no longer matches).
"""

import os
import sys
import time

import numpy as np

from p2pkv.keys import ChunkKey
from p2pkv.secret import ClusterSecret
from p2pkv.transport.base import make_transport


def chunk_bytes(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, size, dtype=np.uint8)


def key_of(index: int) -> ChunkKey:
    return ChunkKey(index.to_bytes(4, "little") * 8)


def main() -> None:
    ready, size, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kind = sys.argv[5] if len(sys.argv) > 5 else "tcp"
    secret = os.environ.get("P2PKV_TEST_SECRET")
    transport = make_transport(kind, bind_host="127.0.0.1",
                               secret=ClusterSecret(secret.encode()) if secret else None)
    store = transport.create_store(size, n)
    for i in range(n):
        w = store.reserve(key_of(i))
        np.frombuffer(w.view, dtype=np.uint8)[:] = chunk_bytes(seed, i, size)
        store.commit(w)
    corrupt = os.environ.get("P2PKV_TEST_CORRUPT")
    if corrupt is not None:
        p = store.pin(key_of(int(corrupt)))
        store.slot_view(p.index)[size // 2] ^= 0xFF
        store.unpin(p)
    address = transport.serve(store)
    with open(ready + ".tmp", "w") as f:
        f.write(address)
    os.replace(ready + ".tmp", ready)
    try:
        while True:
            time.sleep(1)
    finally:
        transport.close()


if __name__ == "__main__":
    main()
