"""A stand-alone data-plane peer for transport tests and benchmarks: fills a store with seeded
random chunks, serves it, writes its address to a ready file, and runs until killed.

    python -m tests.peer_process READY_FILE CHUNK_BYTES NUM_CHUNKS SEED [KIND]

KIND is tcp (default) or shm. Test hooks, from the environment (only this script reads them):
P2PKV_TEST_SECRET (the cluster secret), P2PKV_TEST_CORRUPT=i (flip a byte of chunk i after
it is committed, so its digest no longer matches), P2PKV_TEST_BIND_HOST (default 127.0.0.1),
P2PKV_TEST_MEMBER_PLANE=1 (key the data plane from ``data_plane_secret``, as the connector),
P2PKV_TEST_IDENTITY=INSTANCE (serve with that instance's key pair, derived from the secret, as
the connector does: ``transport/identity.py``), P2PKV_TEST_HEALTH=FILE (write the server's
``ServerHealth`` there as JSON every 0.1 s).
With P2PKV_TEST_DIRECTORY=ENDPOINT the peer also registers there, as an instance would, and
publishes its keys, then reports its server's health (``ServerHealth.counters``) every
0.2 s: P2PKV_TEST_INSTANCE (default peer-PID), P2PKV_TEST_NAMESPACE (default
"test"), P2PKV_TEST_PROBE (the hash-seed probe, default "probe").
"""

import dataclasses
import json
import os
import sys
import time

import numpy as np

from p2pkv.directory.client import DirectoryClient, Registration
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.directory.auth import instance_keys
from p2pkv.secret import ClusterSecret, data_plane_secret
from p2pkv.transport.choose import make_transport
from p2pkv.transport.identity import Identity


def chunk_bytes(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, size, dtype=np.uint8)


def key_of(index: int) -> ChunkKey:
    return ChunkKey(index.to_bytes(4, "little") * 8)


def main() -> None:
    ready, size, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kind = sys.argv[5] if len(sys.argv) > 5 else "tcp"
    env = os.environ
    secret = ClusterSecret(env["P2PKV_TEST_SECRET"].encode()) if env.get("P2PKV_TEST_SECRET") \
        else None
    # P2PKV_TEST_MEMBER_PLANE=1: key the data plane as the connector does (from
    # data_plane_secret, what a credential file carries), as p2pkv doctor expects
    plane = (data_plane_secret(secret) if secret is not None
             and env.get("P2PKV_TEST_MEMBER_PLANE") else secret)
    identity = None
    if secret is not None and env.get("P2PKV_TEST_IDENTITY"):
        identity = Identity.from_curve_secret(
            instance_keys(secret, InstanceId(env["P2PKV_TEST_IDENTITY"])).secret)
    transport = make_transport(kind, bind_host=env.get("P2PKV_TEST_BIND_HOST", "127.0.0.1"),
                               secret=plane, identity=identity)
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
    directory = None
    if env.get("P2PKV_TEST_DIRECTORY"):
        directory = DirectoryClient(env["P2PKV_TEST_DIRECTORY"], secret=secret)
        directory.register(Registration(
            InstanceId(env.get("P2PKV_TEST_INSTANCE", f"peer-{os.getpid()}")), time.time_ns(),
            Namespace(env.get("P2PKV_TEST_NAMESPACE", "test")), address,
            env.get("P2PKV_TEST_PROBE", "probe"), (transport.name,)))
        directory.publish([key_of(i) for i in range(n)])
    with open(ready + ".tmp", "w") as f:
        f.write(address)
    os.replace(ready + ".tmp", ready)
    health = env.get("P2PKV_TEST_HEALTH")
    try:
        while True:
            if directory is not None:  # as the worker does: its server's health
                directory.report(transport.health().counters())
            if health:
                with open(health + ".tmp", "w") as f:
                    json.dump(dataclasses.asdict(transport.health()), f)
                os.replace(health + ".tmp", health)
            time.sleep(0.1 if health else 0.2)
    finally:
        if directory is not None:
            directory.close()
        transport.close()


if __name__ == "__main__":
    main()
