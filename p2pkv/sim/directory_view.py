"""The trace bench's side of the real directory: chunk keys for trace blocks, and the
router's replica of who holds what, from the directory's change feed.

Used by the p2pkv policies (``sim/policies.py``). A trace block (512 tokens) is
``keys_per_block`` chunks as the connector names them (128-token chunks by default), each
with its own 32-byte key, so publishes and lookups carry what a real cluster's would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from p2pkv.directory.client import FeedSubscriber
from p2pkv.directory.protocol import ChunksChanged, InstanceJoined, InstanceLeft
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret


class BlockKeys:
    """Trace block id <-> the chunk keys it stands for (made once per block, on demand)."""

    def __init__(self, keys_per_block: int) -> None:
        if keys_per_block < 1:
            raise ValueError("keys_per_block must be at least 1")
        self.per_block = keys_per_block
        self._keys: dict[int, tuple[ChunkKey, ...]] = {}
        self._block_of: dict[ChunkKey, int] = {}
        """First key of each block -> block (enough: blocks are published whole)."""

    def of(self, block: int) -> tuple[ChunkKey, ...]:
        keys = self._keys.get(block)
        if keys is None:
            raw = block.to_bytes(8, "little")
            keys = tuple(ChunkKey(hashlib.blake2b(raw + bytes([j]), digest_size=32).digest())
                         for j in range(self.per_block))
            self._keys[block] = keys
            self._block_of[keys[0]] = block
        return keys

    def flat(self, blocks: Iterable[int]) -> list[ChunkKey]:
        return [k for b in blocks for k in self.of(b)]

    def block_of(self, key: ChunkKey) -> int | None:
        return self._block_of.get(key)


class FeedView:
    """block -> instances whose stores hold it, replicated from the change feed (a real
    :class:`FeedSubscriber`: snapshot, then events; resyncs on a gap)."""

    def __init__(self, endpoint: str, namespace: Namespace, instance_index: dict[InstanceId, int],
                 keys: BlockKeys, *, secret: ClusterSecret | None = None) -> None:
        self._sub = FeedSubscriber(endpoint, secret=secret)
        self._namespace = namespace
        self._index = instance_index
        self._keys = keys
        self.holders: dict[int, set[int]] = {}
        self._by_instance: dict[int, set[int]] = {}
        self._resyncs = 0
        self.events = 0

    def start(self, timeout_s: float) -> bool:
        ok = self._sub.sync(timeout_s)
        self._rebuild()
        return ok

    def poll(self) -> None:
        events = self._sub.poll(0)
        if self._sub.resyncs != self._resyncs:
            self._rebuild()
            return
        for event in events:
            self.events += 1
            if isinstance(event, ChunksChanged):
                if event.namespace != self._namespace:
                    continue
                i = self._index.get(event.instance)
                if i is None:
                    continue
                if event.reset:
                    self._drop(i)
                self._apply(i, event.added, add=True)
                self._apply(i, event.removed, add=False)
            elif isinstance(event, InstanceLeft):
                i = self._index.get(event.instance)
                if i is not None:
                    self._drop(i)
            elif isinstance(event, InstanceJoined):
                pass

    def close(self) -> None:
        self._sub.close()

    def _apply(self, i: int, keys: Sequence[ChunkKey], add: bool) -> None:
        mine = self._by_instance.setdefault(i, set())
        holders = self.holders
        for key in keys:
            block = self._keys.block_of(key)
            if block is None:
                continue
            if add:
                holders.setdefault(block, set()).add(i)
                mine.add(block)
            else:
                s = holders.get(block)
                if s is not None:
                    s.discard(i)
                    if not s:
                        del holders[block]
                mine.discard(block)

    def _drop(self, i: int) -> None:
        self._apply_blocks_removed(i, self._by_instance.pop(i, set()))

    def _apply_blocks_removed(self, i: int, blocks: set[int]) -> None:
        for block in blocks:
            s = self.holders.get(block)
            if s is not None:
                s.discard(i)
                if not s:
                    del self.holders[block]

    def _rebuild(self) -> None:
        self._resyncs = self._sub.resyncs
        self.holders, self._by_instance = {}, {}
        for instance, keys in self._sub.holdings.items():
            i = self._index.get(instance)
            if i is not None and self._sub.namespaces.get(instance) == self._namespace:
                self._apply(i, list(keys), add=True)
