"""Consistent-hash placement, rebalancing, and merging per-shard lookups (pure)."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from p2pkv.directory.protocol import Holder
from p2pkv.directory.ring import HashRing, ShardAnswer, ShardId, merge_runs
from p2pkv.keys import ChunkKey

KEYS = [ChunkKey(hashlib.sha256(str(i).encode()).digest()) for i in range(20_000)]


def _ring(n: int) -> HashRing:
    return HashRing([ShardId(f"s{i}") for i in range(n)])


def test_placement_is_deterministic_and_balanced():
    ring = _ring(4)
    assert [ring.shard_of(k) for k in KEYS[:50]] == [_ring(4).shard_of(k) for k in KEYS[:50]]
    counts = Counter(ring.shard_of(k) for k in KEYS)
    assert set(counts) == set(ring.shards)
    assert max(counts.values()) < 1.35 * len(KEYS) / 4


@pytest.mark.parametrize("before, after", [(4, 5), (5, 4), (1, 2), (2, 4)])
def test_adding_or_removing_a_shard_moves_only_its_share(before, after):
    a, b = _ring(before), _ring(after)
    moved = [k for k in KEYS if a.shard_of(k) != b.shard_of(k)]
    changed = abs(after - before) / max(after, before)
    assert len(moved) < 1.4 * changed * len(KEYS)
    # every moved key goes to (or comes from) a shard that is only in one of the rings
    only = set(a.shards) ^ set(b.shards)
    assert all(a.shard_of(k) in only or b.shard_of(k) in only for k in moved)


def test_one_shard_is_the_plain_directory():
    ring = _ring(1)
    assert ring.partition(KEYS[:5]) == {"s0": [0, 1, 2, 3, 4]}
    with pytest.raises(ValueError):
        HashRing([])


def test_merge_runs_over_shards():
    # keys 0..5; shard a has positions 0,2,4 and b has 1,3,5
    a, b = ShardId("a"), ShardId("b")
    answers = {
        a: ShardAnswer([0, 2, 4], [Holder("x", "h:1", 3), Holder("y", "h:2", 1)]),
        b: ShardAnswer([1, 3, 5], [Holder("x", "h:1", 2), Holder("y", "h:2", 3)]),
    }
    # x holds a's 0,2,4 and b's 1,3 -> misses 5; y holds a's 0 only -> misses 2
    assert merge_runs(6, answers) == [Holder("x", "h:1", 5), Holder("y", "h:2", 2)]
    # a shard that did not answer: nobody holds its keys
    answers[b] = ShardAnswer([1, 3, 5], None)
    assert merge_runs(6, answers) == [Holder("x", "h:1", 1), Holder("y", "h:2", 1)]
    # holders absent from a shard's reply hold none of its keys
    answers[b] = ShardAnswer([1, 3, 5], [])
    assert merge_runs(6, answers) == [Holder("x", "h:1", 1), Holder("y", "h:2", 1)]
    assert merge_runs(6, {a: ShardAnswer([0, 2, 4], [])}) == []
