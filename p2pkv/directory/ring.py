"""Consistent hashing of chunk keys over directory shards, and merging per-shard lookups.

Used by the sharded client (``directory/shards.py``) and ``p2pkv bench trace --shards``. Each
shard owns ``vnodes`` points on a 64-bit ring; a key belongs to the first point at or after
its hash, so adding or removing a shard moves only the keys of the points it gains or loses
(about 1/S of them). A Lookup's keys are split by shard; each shard answers runs over its
own keys only, and :func:`merge_runs` turns those back into runs over the whole prompt.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NewType

import msgspec

from p2pkv.directory.protocol import TIER_LEASED, Holder
from p2pkv.keys import ChunkKey

ShardId = NewType("ShardId", str)
"""A shard's name; its place on the ring depends on the name only."""

DEFAULT_VNODES = 128


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Which shard owns a key. Immutable; build a new ring to add or remove shards."""

    def __init__(self, shards: Iterable[ShardId], vnodes: int = DEFAULT_VNODES) -> None:
        self.shards: tuple[ShardId, ...] = tuple(dict.fromkeys(shards))
        if not self.shards or vnodes < 1:
            raise ValueError("a ring needs at least one shard and one point per shard")
        points = sorted((_point(f"{s}#{v}".encode()), s)
                        for s in self.shards for v in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [s for _, s in points]

    def shard_of(self, key: ChunkKey) -> ShardId:
        if len(self.shards) == 1:
            return self.shards[0]
        i = bisect.bisect_left(self._hashes, _point(key))
        return self._owners[i % len(self._owners)]

    def partition(self, keys: Sequence[ChunkKey]) -> dict[ShardId, list[int]]:
        """Positions of ``keys`` per owning shard, in order."""
        if len(self.shards) == 1:
            return {self.shards[0]: list(range(len(keys)))}
        parts: dict[ShardId, list[int]] = {}
        for i, key in enumerate(keys):
            parts.setdefault(self.shard_of(key), []).append(i)
        return parts


@dataclass(frozen=True, slots=True)
class ShardAnswer:
    """One shard's Lookup over the keys at ``positions`` of the prompt (None: no answer)."""

    positions: Sequence[int]
    holders: Sequence[Holder] | None


def merge_runs(n_keys: int, answers: Mapping[ShardId, ShardAnswer]) -> list[Holder]:
    """Runs over the whole prompt: a holder's run ends at the first key, on any shard, it
    does not hold (a shard that did not answer holds nothing for anyone). Longest first."""
    limits: dict[str, int] = {}
    seen: dict[str, Holder] = {}  # a holder as one shard reported it (address, engine, slice)
    every = set()
    for answer in answers.values():
        for h in answer.holders or ():
            every.add(h.instance)
            seen[h.instance] = h
    for instance in every:
        limit = n_keys
        for answer in answers.values():
            if not answer.positions:
                continue
            run = 0
            for h in answer.holders or ():
                if h.instance == instance:
                    run = h.run
                    break
            if run < len(answer.positions):
                limit = min(limit, answer.positions[run])
        limits[instance] = limit
    merged = [_tiered(msgspec.structs.replace(seen[i], run=run), answers)
              for i, run in limits.items() if run > 0]
    merged.sort(key=lambda h: (-h.run, h.instance))
    return merged


def _tiered(h: Holder, answers: Mapping[ShardId, ShardAnswer]) -> Holder:
    """``h`` with the tier over every shard (issue 14): TIER_LEASED, until the earliest
    lease, when any shard says so (its run may reach past the merged one: the worse answer,
    never a wrong "store"); else what the shards said."""
    leased = [x.lease_left_ms for a in answers.values() for x in a.holders or ()
              if x.instance == h.instance and x.tier == TIER_LEASED]
    if leased:
        return msgspec.structs.replace(h, tier=TIER_LEASED, lease_left_ms=min(leased))
    return h
