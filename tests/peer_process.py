"""A stand-alone data-plane peer for transport tests: fills a store with seeded random chunks,
serves it over TCP, writes its address to a ready file, and runs until killed.

    python tests/peer_process.py READY_FILE CHUNK_BYTES NUM_CHUNKS SEED
"""

import sys
import time

import numpy as np

from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore
from p2pkv.transport.tcp import TcpTransport


def chunk_bytes(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, size, dtype=np.uint8)


def key_of(index: int) -> ChunkKey:
    return ChunkKey(index.to_bytes(4, "little") * 8)


def main() -> None:
    ready, size, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = ChunkStore(size, n)
    for i in range(n):
        w = store.reserve(key_of(i))
        np.frombuffer(w.view, dtype=np.uint8)[:] = chunk_bytes(seed, i, size)
        store.commit(w)
    address = TcpTransport(bind_host="127.0.0.1").serve(store)
    with open(ready + ".tmp", "w") as f:
        f.write(address)
    import os
    os.replace(ready + ".tmp", ready)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
