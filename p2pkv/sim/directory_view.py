"""The trace bench's side of the real directory: chunk keys for trace blocks, and the
router's replica of who holds what, from the directory's change feed.

Used by the p2pkv policies (``sim/policies.py``). A trace block (512 tokens) is
``keys_per_block`` chunks as the connector names them (128-token chunks by default), each
with its own 32-byte key, so publishes and lookups carry what a real cluster's would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from p2pkv.directory.feed import FeedSubscriber
from p2pkv.directory.protocol import ChunksChanged, InstanceLeft
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


class _Follower:
    """One shard's feed and what it contributed to the shared index."""

    def __init__(self, endpoint: str, secret: ClusterSecret | None) -> None:
        self.sub = FeedSubscriber(endpoint, secret=secret)
        self.by_instance: dict[int, set[int]] = {}
        self.resyncs = 0


class FeedView:
    """block -> instances whose stores hold it, replicated from the change feed of each
    directory shard (a real :class:`FeedSubscriber` each: snapshot, then events; resyncs on
    a gap). NOTE: a block's first key lives on exactly one shard, and only first keys are
    indexed, so the shards' contributions never overlap."""

    def __init__(self, endpoints: Sequence[str], namespace: Namespace,
                 instance_index: dict[InstanceId, int], keys: BlockKeys, *,
                 secret: ClusterSecret | None = None) -> None:
        self._followers = [_Follower(e, secret) for e in endpoints]
        self._namespace = namespace
        self._index = instance_index
        self._keys = keys
        self.holders: dict[int, set[int]] = {}
        self.events = 0

    def start(self, timeout_s: float) -> bool:
        ok = True
        for f in self._followers:
            ok = f.sub.sync(timeout_s) and ok
            self._rebuild(f)
        return ok

    def poll(self) -> None:
        for f in self._followers:
            events = f.sub.poll(0)
            if f.sub.resyncs != f.resyncs:
                self._rebuild(f)
                continue
            for event in events:
                self.events += 1
                if isinstance(event, ChunksChanged):
                    if event.namespace != self._namespace:
                        continue
                    i = self._index.get(event.instance)
                    if i is None:
                        continue
                    if event.reset:
                        self._drop(f, i)
                    self._apply(f, i, event.added, add=True)
                    self._apply(f, i, event.removed, add=False)
                elif isinstance(event, InstanceLeft):
                    i = self._index.get(event.instance)
                    if i is not None:
                        self._drop(f, i)

    def close(self) -> None:
        for f in self._followers:
            f.sub.close()

    def _apply(self, f: _Follower, i: int, keys: Sequence[ChunkKey], add: bool) -> None:
        mine = f.by_instance.setdefault(i, set())
        holders = self.holders
        for key in keys:
            block = self._keys.block_of(key)
            if block is None:
                continue
            if add:
                holders.setdefault(block, set()).add(i)
                mine.add(block)
            elif block in mine:
                mine.discard(block)
                self._unhold(block, i)

    def _unhold(self, block: int, i: int) -> None:
        s = self.holders.get(block)
        if s is not None:
            s.discard(i)
            if not s:
                del self.holders[block]

    def _drop(self, f: _Follower, i: int) -> None:
        for block in f.by_instance.pop(i, set()):
            self._unhold(block, i)

    def _rebuild(self, f: _Follower) -> None:
        f.resyncs = f.sub.resyncs
        for i in list(f.by_instance):
            self._drop(f, i)
        for instance, keys in f.sub.holdings.items():
            i = self._index.get(instance)
            if i is not None and f.sub.namespaces.get(instance) == self._namespace:
                self._apply(f, i, list(keys), add=True)
