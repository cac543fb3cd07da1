import numpy as np
import pytest

from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, digest


def k(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32)


def put(store: ChunkStore, i: int) -> None:
    w = store.reserve(k(i))
    assert w is not None
    np.frombuffer(w.view, dtype=np.uint8)[:] = i
    store.commit(w)


def test_put_pin_read_digest():
    s = ChunkStore(64, 4)
    put(s, 1)
    p = s.pin(k(1))
    assert p is not None and bytes(p.view) == bytes([1]) * 64
    assert p.digest == digest(memoryview(bytes([1]) * 64))
    s.unpin(p)
    assert s.reserve(k(1)) is None  # already stored


def test_lru_evicts_oldest_and_reports_it():
    s = ChunkStore(8, 2)
    put(s, 1)
    put(s, 2)
    s.unpin(s.pin(k(1)))  # 1 is now most recently used
    put(s, 3)
    assert k(2) not in s and k(1) in s and k(3) in s
    assert s.take_evicted() == [k(2)]
    assert s.take_evicted() == []


def test_pinned_slot_is_never_reused():
    s = ChunkStore(8, 1)
    put(s, 1)
    p = s.pin(k(1))
    assert s.reserve(k(2)) is None  # the only slot is pinned
    assert s.counters.full == 1
    s.unpin(p)
    w = s.reserve(k(2))
    assert w is not None and w.generation > p.generation


def test_abort_frees_the_slot():
    s = ChunkStore(8, 1)
    w = s.reserve(k(1))
    s.abort(w)
    assert k(1) not in s
    put(s, 2)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        ChunkStore(0, 1)


def test_untouched_ahead_names_the_next_free_slots_until_written_or_prefaulted():
    """Issue 17: the save thread faults in the slots ``reserve`` hands out next."""
    s = ChunkStore(3 * 4096, 4)
    assert s.untouched_ahead(2) == [0, 1]
    put(s, 1)  # takes slot 0
    assert s.untouched_ahead(2) == [1, 2]
    assert s.prefault(1) is True
    assert s.untouched_ahead(2) == [2]  # of the next two (1, 2), slot 1 is faulted in
    assert s.untouched_ahead(10) == [2, 3]


@pytest.mark.parametrize("shared", [False, True])
def test_prefault_keeps_the_bytes_of_a_slot_being_written(shared):
    s = ChunkStore(5 * 4096 + 100, 2, shared=shared)
    w = s.reserve(k(7))
    assert w is not None
    np.frombuffer(w.view, dtype=np.uint8)[:] = 7
    assert s.prefault(w.index, piece_bytes=4096) is True  # e.g. a prefault racing a save
    s.commit(w)
    p = s.pin(k(7))
    assert p is not None and bytes(p.view) == bytes([7]) * s.slot_bytes
    assert p.digest == digest(memoryview(bytes([7]) * s.slot_bytes))
    s.unpin(p)
    s.close()


def test_prefault_stops_between_pieces_when_asked():
    s = ChunkStore(4 * 4096, 2)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert s.prefault(0, piece_bytes=4096, should_stop=stop) is False
    assert s.untouched_ahead(1) == [0]  # not counted as touched
