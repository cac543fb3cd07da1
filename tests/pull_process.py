"""A stand-alone puller for transport tests: pulls a peer_process's chunks and checks every
byte against the seeded data, then prints one JSON line and exits (0: all chunks OK).

    python -m tests.pull_process ADDRESS CHUNK_BYTES NUM_CHUNKS SEED [KIND]

KIND is the puller's transport (default auto). P2PKV_TEST_SECRET: the cluster secret
(P2PKV_TEST_MEMBER_PLANE=1: key the data plane from data_plane_secret, as peer_process). The line
says how many chunks arrived intact and over which path (``tcp``/``shm`` pull counts), so a
test run in another network namespace can check both the bytes and the path they took.
"""

import json
import os
import sys

import numpy as np

from p2pkv.secret import ClusterSecret, data_plane_secret
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.choose import make_transport
from tests.peer_process import chunk_bytes, key_of

TIMEOUT_S = 10.0


def main() -> int:
    address, size, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kind = sys.argv[5] if len(sys.argv) > 5 else "auto"
    secret = os.environ.get("P2PKV_TEST_SECRET")
    key = ClusterSecret(secret.encode()) if secret else None
    if key is not None and os.environ.get("P2PKV_TEST_MEMBER_PLANE"):
        key = data_plane_secret(key)  # keyed as the connector and p2pkv doctor key it
    transport = make_transport(kind, bind_host="127.0.0.1", store_bytes=size * n, secret=key)
    try:
        bufs = [np.zeros(size, dtype=np.uint8) for _ in range(n)]
        items = [PullItem(key_of(i), (memoryview(buf),)) for i, buf in enumerate(bufs)]
        results = transport.pull(address, items, TIMEOUT_S)
        intact = sum(r.outcome is Outcome.OK and np.array_equal(buf, chunk_bytes(seed, i, size))
                     for i, (r, buf) in enumerate(zip(results, bufs)))
        counters = getattr(transport, "counters", None)
        print(json.dumps({"intact": intact, "chunks": n,
                          "errors": [r.reason for r in results if r.outcome is not Outcome.OK],
                          "tcp": getattr(counters, "tcp", 0), "shm": getattr(counters, "shm", 0)}))
        return 0 if intact == n else 1
    finally:
        transport.close()


if __name__ == "__main__":
    sys.exit(main())
