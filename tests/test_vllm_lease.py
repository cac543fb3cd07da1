"""LeaseTable (``p2pkv.vllm.lease``): leases end on expiry, on request and under memory
pressure; a request is handed back only when its lease takes no pins and holds none; and, the
check the design rests on, a block that vLLM reuses the moment it is handed back is never read
as the old chunk by a puller pinning it concurrently."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from p2pkv.keys import ChunkKey
from p2pkv.vllm.lease import LeaseError, LeaseTable


def key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_serves_until_it_expires_then_is_handed_back_once():
    clock = Clock()
    t = LeaseTable(clock=clock)
    assert t.grant("r", [(key(1), (3, 4))], ttl_s=5.0)
    pin = t.pin(key(1))
    assert pin is not None and pin.block_ids == (3, 4)
    t.unpin(pin)
    assert t.take_released() == set()
    clock.now = 5.0
    assert t.pin(key(1)) is None  # expired: no new reads
    assert t.take_released() == {"r"}
    assert t.take_released() == set()
    assert t.held_blocks() == set()


def test_a_pinned_lease_is_not_handed_back_until_unpinned():
    t = LeaseTable(clock=Clock())
    t.grant("r", [(key(1), (3,))], ttl_s=5.0)
    pin = t.pin(key(1))
    t.end("r", "puller done")
    assert t.pin(key(1)) is None
    assert t.take_released() == set(), "a pinned block was handed back to vLLM"
    assert t.unpin(pin), "the last pin of an ended lease says it can be handed back"
    assert t.take_released() == {"r"}
    with pytest.raises(LeaseError):
        t.unpin(pin)


def test_unpin_says_when_a_lease_becomes_ready_to_hand_back():
    t = LeaseTable(clock=Clock())
    t.grant("r", [(key(1), (3,))], ttl_s=5.0)
    a, b = t.pin(key(1)), t.pin(key(1))
    assert not t.unpin(a), "an open lease is not ready"
    t.end("r", "pulled")
    assert t.unpin(b), "its last read ended after it ended: ready (the engine is woken)"


def test_a_puller_that_never_comes_costs_one_lease():
    clock = Clock()
    t = LeaseTable(clock=clock)
    t.grant("r", [(key(1), (1,)), (key(2), (2,))], ttl_s=1.0)
    clock.now = 1.0
    assert t.take_released() == {"r"}  # without any pin or pull


def test_over_the_block_cap_a_grant_is_refused_and_handed_back_at_once():
    t = LeaseTable(max_blocks=3, clock=Clock())
    assert t.grant("a", [(key(1), (1, 2))], ttl_s=5.0)
    assert not t.grant("b", [(key(2), (3, 4))], ttl_s=5.0)
    assert t.grant("c", [(key(3), (2, 3))], ttl_s=5.0)  # shares block 2 with "a"
    assert t.take_released() == {"b"}
    with pytest.raises(LeaseError):
        t.grant("a", [(key(4), (9,))], ttl_s=5.0)


def test_memory_pressure_ends_the_leases_expiring_first():
    t = LeaseTable(clock=Clock())
    t.grant("late", [(key(1), (1, 2))], ttl_s=9.0)
    t.grant("soon", [(key(2), (3, 4))], ttl_s=2.0)
    t.grant("mid", [(key(3), (5, 6))], ttl_s=5.0)
    assert t.end_oldest(3) == ["soon", "mid"]
    assert t.take_released() == {"soon", "mid"}
    assert t.pin(key(1)) is not None


def test_two_leases_on_one_chunk_serve_while_either_is_open():
    t = LeaseTable(clock=Clock())
    t.grant("a", [(key(1), (7,))], ttl_s=5.0)
    t.grant("b", [(key(1), (7,))], ttl_s=5.0)  # vLLM shares prefix blocks between requests
    t.end("a", "done")
    pin = t.pin(key(1))
    assert pin is not None and pin.req_id == "b"
    assert t.take_released() == {"a"}
    t.unpin(pin)


def test_a_block_reused_the_moment_it_is_handed_back_is_never_read_as_the_old_chunk():
    """A simulated vLLM: computes each request's chunk into a free block, leases it, and
    overwrites a block with other bytes the moment ``take_released`` hands its lease back (the
    block is free and reused); pullers pin and read concurrently, and every read made under a
    pin must be the bytes the lease was granted over."""
    blocks, size, rounds = 6, 4096, 400
    cache = np.zeros((blocks, size), dtype=np.uint8)
    free = list(range(blocks))
    t = LeaseTable()
    content: dict[ChunkKey, int] = {}  # key -> the byte its block held when leased
    block_of: dict[str, int] = {}
    bad: list[str] = []
    reads = [0]
    stop = threading.Event()

    def rkey(r: int) -> ChunkKey:
        return ChunkKey(r.to_bytes(32, "big"))

    def puller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            k = rkey(max(0, len(content) - 1 - int(rng.integers(0, blocks))))
            pin = t.pin(k)
            if pin is None:
                time.sleep(0)
                continue
            time.sleep(0.0002)  # a send takes a while: the blocks must stay as leased
            got = cache[list(pin.block_ids)]
            if not (got == content[k]).all():
                bad.append(f"read {np.unique(got)} under a pin, leased as {content[k]}")
            reads[0] += 1
            t.unpin(pin)

    threads = [threading.Thread(target=puller, args=(s,)) for s in range(3)]
    for th in threads:
        th.start()
    try:
        for r in range(rounds):
            while not free:  # vLLM needs a block: leases come back when unpinned
                for req in t.take_released():
                    b = block_of.pop(req)
                    cache[b] = 0xEE  # freed and reused at once by another request
                    free.append(b)
                time.sleep(0)
            b = free.pop()
            content[rkey(r)] = r % 250 + 1
            cache[b] = content[rkey(r)]  # request r's chunk computed into block b
            block_of[f"r{r}"] = b
            t.grant(f"r{r}", [(rkey(r), (b,))], ttl_s=60.0)
            if r >= 2:
                t.end(f"r{r - 2}", "puller done")
            time.sleep(0.0005)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not bad, bad[:3]
    assert reads[0] > rounds // 2  # the pullers did read, concurrently
