"""The relay (``p2pkv.vllm.relay``): worker ranks with equal slices pull a chunk once per
instance. Real WorkerSides (one thread each, as the ranks of one instance), a real TCP
transport and the relay's real sockets and shared slab on loopback; a barrier stands in for
vLLM's gather over the ranks."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.keys import ChunkKey, InstanceId, Namespace  # noqa: E402
from p2pkv.slices import KVSlice, tp_slices  # noqa: E402
from p2pkv.transport.peer import PeerTransport  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.layout import KVLayout  # noqa: E402
from p2pkv.vllm.metadata import ChunkLoad, LoadPlan, P2PKVMetadata, SavePlan  # noqa: E402
from p2pkv.vllm.relay import (  # noqa: E402
    Landed,
    Relayed,
    RelayEndpoint,
    RelayFollower,
    RelayLeader,
    RelaySetup,
)
from p2pkv.vllm.sources import Source  # noqa: E402
from p2pkv.vllm.worker import WorkerSide  # noqa: E402
from tests.test_vllm_worker import RecordingDirectory, sources_for, wait_finished  # noqa: E402

LAYERS = 3
CHUNK_BLOCKS = 2


class BarrierExchange:
    """Stands in for the connector's gather over vLLM's world group: every rank's endpoint,
    once all ``n`` ranks have called."""

    def __init__(self, n: int) -> None:
        self._barrier = threading.Barrier(n, timeout=10)
        self._got: dict[int, RelayEndpoint] = {}

    def __call__(self, me: RelayEndpoint) -> list[RelayEndpoint]:
        self._got[me.rank] = me
        self._barrier.wait()
        return list(self._got.values())


def _config(**kw) -> ConnectorConfig:
    base = dict(directory="tcp://127.0.0.1:1", store_gib=0.001, pull_timeout_s=2)
    return ConnectorConfig(**{**base, **kw})


def instance(slices: tuple[KVSlice, ...], *, relay_bytes: int = 1 << 20, blocks: int = 8,
             relay: bool = True, **config):
    """The worker ranks of one instance (``slices`` by rank), registered concurrently (the
    relay's rendezvous is a collective): [(worker, caches, directory, slice)]."""
    setup = RelaySetup(slices, BarrierExchange(len(slices)), relay_bytes) if relay else None

    def one(rank: int):
        sl = slices[rank]
        d = RecordingDirectory()
        caches = {f"l{i}": torch.randn(blocks, sl.heads, 4, 8) for i in range(LAYERS)}
        w = WorkerSide(_config(**config), instance=InstanceId(f"i/{rank}"),
                       namespace=Namespace("ns"), chunk_blocks=CHUNK_BLOCKS,
                       transport=PeerTransport(), directory=d, rank=rank, slice=sl,
                       saves=slices.index(sl) == rank, relay=setup)
        w.register_kv_caches(KVLayout.from_kv_caches(caches))
        return w, caches, d, sl

    with ThreadPoolExecutor(len(slices)) as pool:
        return list(pool.map(one, range(len(slices))))


def holder_with(keys, heads: int):
    """A TP 1 holder of ``heads`` KV heads that saved ``keys`` (chunk i from blocks 2i, 2i+1)."""
    h = instance(tp_slices(num_kv_heads=heads, num_layers=LAYERS, tp_size=1), relay=False)
    w = h[0][0]
    w.save(P2PKVMetadata(saves=[SavePlan(k, (2 * i, 2 * i + 1)) for i, k in enumerate(keys)]))
    assert w.wait_saved(5.0)
    return h


def pull_all(pullers, req, chunks, sources) -> None:
    for w, *_ in pullers:
        w.start_loads(P2PKVMetadata(loads=[LoadPlan(req, tuple(chunks), sources)]))
    for w, *_ in pullers:
        wait_finished(w, req, timeout_s=10)


def chunk_bytes(heads: int) -> int:
    return CHUNK_BLOCKS * LAYERS * heads * 4 * 8 * 4


KEYS = [ChunkKey(bytes([65 + i]) * 32) for i in range(3)]
LOADS = [ChunkLoad(k, (7 - 2 * i, 6 - 2 * i)) for i, k in enumerate(KEYS)]  # blocks 7,6 5,4 3,2


def check_copied(pullers, holder) -> None:
    """Puller block (7-2i, 6-2i) holds the holder's block (2i, 2i+1), at the puller's heads."""
    h_caches, h_slice = holder[0][1], holder[0][3]
    for _, caches, _, sl in pullers:
        hh = slice(sl.head_start - h_slice.head_start, sl.head_end - h_slice.head_start)
        for name in caches:
            for i in range(len(KEYS)):
                assert torch.equal(caches[name][7 - 2 * i], h_caches[name][2 * i][hh])
                assert torch.equal(caches[name][6 - 2 * i], h_caches[name][2 * i + 1][hh])


def shutdown(*groups) -> None:
    for g in groups:
        for w, *_ in g:
            w.shutdown()


def test_mla_tp2_pulls_each_chunk_over_the_network_once():
    """MLA: one latent 'head' on both ranks. Rank 0 pulls, rank 1 takes its copy from the
    relay; the holder serves each chunk once; both ranks hold the holder's bytes."""
    holder = holder_with(KEYS, heads=1)
    mla = (KVSlice.whole(1, LAYERS),) * 2
    pullers = instance(mla)
    assert pullers[0][0]._relay.leader is not None
    assert pullers[1][0]._relay.follower is not None
    sources = sources_for(holder, pullers)
    served = holder[0][0]._store.counters.served
    pull_all(pullers, "r", LOADS, sources)
    assert [w.take_failed_blocks() for w, *_ in pullers] == [set(), set()]
    check_copied(pullers, holder)
    assert holder[0][0]._store.counters.served - served == len(KEYS), "served once per chunk"
    n = len(KEYS) * chunk_bytes(1)
    assert [w.counters.bytes_pulled for w, *_ in pullers] == [n, 0]
    assert [w.counters.chunks_pulled for w, *_ in pullers] == [3, 3]
    assert pullers[1][0].counters.bytes_taken_from_relay == n
    deadline = time.monotonic() + 5  # the follower's Taken reaches the leader asynchronously
    while pullers[0][0]._relay.leader.bytes_relayed < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pullers[0][0].take_finished_recving()  # reports the counters
    last = pullers[0][2].reports[-1]
    assert (last["chunks_relayed"], last["bytes_relayed"]) == (3, n)
    assert pullers[0][0].counters.chunk_bytes == chunk_bytes(1)  # one copy per instance
    shutdown(holder, pullers)


def test_replicated_heads_each_head_is_pulled_once_and_relayed_to_its_sibling():
    """2 KV heads at TP 4: ranks 0 and 2 pull heads 0 and 1 (a selection of the TP 1
    holder's chunk), ranks 1 and 3 take them from the relay."""
    holder = holder_with(KEYS, heads=2)
    slices = tp_slices(num_kv_heads=2, num_layers=LAYERS, tp_size=4)
    pullers = instance(slices)
    sources = sources_for(holder, pullers)
    pull_all(pullers, "r", LOADS, sources)
    assert all(w.take_failed_blocks() == set() for w, *_ in pullers)
    check_copied(pullers, holder)
    n = len(KEYS) * chunk_bytes(1)
    assert [w.counters.bytes_pulled for w, *_ in pullers] == [n, 0, n, 0]
    shutdown(holder, pullers)


def test_a_dead_holder_fails_the_same_chunks_on_every_rank_at_once():
    holder = holder_with(KEYS, heads=1)
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2)
    sources = sources_for(holder, pullers)
    holder[0][0].shutdown()  # connection refused
    t0 = time.monotonic()
    pull_all(pullers, "r", LOADS, sources)
    assert time.monotonic() - t0 < 1.5, "a dead holder is seen at once, on every rank"
    want = {b for c in LOADS for b in c.block_ids}
    assert [w.take_failed_blocks() for w, *_ in pullers] == [want, want]
    shutdown(pullers)


def test_a_missing_chunk_is_missing_on_every_rank():
    holder = holder_with(KEYS[:2], heads=1)  # the third chunk is not held
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2)
    pull_all(pullers, "r", LOADS, sources_for(holder, pullers))
    assert [w.take_failed_blocks() for w, *_ in pullers] == [{3, 2}, {3, 2}]
    assert [w.counters.chunks_missing for w, *_ in pullers] == [1, 1]
    shutdown(holder, pullers)


def test_a_follower_whose_leader_dies_mid_load_fails_at_once():
    holder = holder_with(KEYS, heads=1)
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2)
    sources = sources_for(holder, pullers)
    follower = pullers[1][0]
    # the leader never runs this load; its relay then goes away (its process died)
    follower.start_loads(P2PKVMetadata(loads=[LoadPlan("r", tuple(LOADS), sources)]))
    time.sleep(0.2)
    t0 = time.monotonic()
    pullers[0][0]._relay.leader.close()
    wait_finished(follower, "r", timeout_s=5)
    assert time.monotonic() - t0 < 1.0
    assert follower.take_failed_blocks() == {b for c in LOADS for b in c.block_ids}
    assert follower.counters.bytes_pulled == 0
    # later loads: the follower pulls for itself
    follower.start_loads(P2PKVMetadata(loads=[LoadPlan("r2", tuple(LOADS), sources)]))
    wait_finished(follower, "r2")
    assert follower.take_failed_blocks() == set()
    assert follower.counters.bytes_pulled == len(KEYS) * chunk_bytes(1)
    shutdown(holder, pullers)


def test_a_silent_leader_fails_the_followers_load_at_its_deadline():
    holder = holder_with(KEYS, heads=1)
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2, pull_timeout_s=0.5)
    follower = pullers[1][0]
    t0 = time.monotonic()
    follower.start_loads(P2PKVMetadata(loads=[LoadPlan("r", tuple(LOADS),
                                                       sources_for(holder, pullers))]))
    wait_finished(follower, "r", timeout_s=5)
    assert 0.5 <= time.monotonic() - t0 < 3.0
    assert follower.take_failed_blocks() == {b for c in LOADS for b in c.block_ids}
    shutdown(holder, pullers)


def test_without_free_slots_every_rank_pulls_for_itself():
    holder = holder_with(KEYS, heads=1)
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2, relay_bytes=2 * chunk_bytes(1))
    pull_all(pullers, "r", LOADS, sources_for(holder, pullers))  # 3 chunks, 2 slots
    assert [w.take_failed_blocks() for w, *_ in pullers] == [set(), set()]
    check_copied(pullers, holder)
    n = len(KEYS) * chunk_bytes(1)
    assert [w.counters.bytes_pulled for w, *_ in pullers] == [n, n]
    shutdown(holder, pullers)


def test_different_sources_are_not_relayed():
    """Ranks with equal slices given different sources (not what the planner does) each
    pull their own."""
    holder = holder_with(KEYS, heads=1)
    pullers = instance((KVSlice.whole(1, LAYERS),) * 2)
    (src,), _ = sources_for(holder, pullers)
    other = Source(src.address, InstanceId("other"), src.holder, src.part)
    pull_all(pullers, "r", LOADS, ((src,), (other,)))
    assert [w.take_failed_blocks() for w, *_ in pullers] == [set(), set()]
    assert pullers[1][0].counters.bytes_pulled == len(KEYS) * chunk_bytes(1)
    shutdown(holder, pullers)


def test_a_reused_slot_fails_the_digest_and_a_bad_token_is_refused():
    leader = RelayLeader(64, 2, hold_s=1.0)
    try:
        with pytest.raises(OSError):
            RelayFollower(1, leader.address, "not-the-token", timeout_s=1.0)
        f = RelayFollower(1, leader.address, leader.token)
        deadline = time.monotonic() + 2
        while 1 not in leader.followers:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leader.view(0, 64)[:] = b"x" * 64
        from p2pkv.store import digest
        good = digest(leader.view(0, 64))
        leader.announce(Landed("r", 0, [Relayed(0, 0, 64, good, "ok")]), [1])
        got = f.collect("r", 1, 1, time.monotonic() + 2)
        assert got.parts[0][0].digest == good and bytes(f.slot(0, 64)) == b"x" * 64
        leader.view(0, 64)[:] = b"y" * 64  # reused: the bytes no longer hash to the digest
        from p2pkv.transport.shm import copy_and_digest
        out = bytearray(64)
        assert copy_and_digest(f.slot(0, 64), [memoryview(out)]) != good
        with pytest.raises(ValueError):
            f.slot(5, 64)  # outside the slab
        f.close()
    finally:
        leader.close()
