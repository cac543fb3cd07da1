"""Steps shared by ``p2pkv bench directory`` and its ``--shards`` mode: the instances' keys,
a Stats call, waiting for a condition by a deadline, progress lines."""

from __future__ import annotations

import argparse
import random
import sys
import time

from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import Stats, StatsReply
from p2pkv.keys import ChunkKey

KEY_BYTES = 32


def _keys(instance: int, n: int) -> list[ChunkKey]:
    """Instance ``instance``'s keys (the same in both modes)."""
    rng = random.Random(instance)
    return [ChunkKey(rng.randbytes(KEY_BYTES)) for _ in range(n)]


def _stats(client: DirectoryClient) -> StatsReply:
    reply = client.call(Stats(), 10)
    if not isinstance(reply, StatsReply):
        raise RuntimeError(f"directory did not answer Stats: {reply}")
    return reply


def _until(predicate, timeout_s: float, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish in time")
        time.sleep(step)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)
