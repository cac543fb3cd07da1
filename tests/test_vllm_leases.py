"""Leases on paged blocks (issue 14, tier 1): the scheduler side's grants and book, and a
worker rank serving leased chunks in place over real TCP on loopback (no vLLM engine)."""

from __future__ import annotations

import threading
import socket
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.keys import ChunkKey, InstanceId, Namespace  # noqa: E402
from p2pkv.transport.base import Outcome, PullItem  # noqa: E402
from p2pkv.transport.peer import PeerTransport  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.layout import KVLayout  # noqa: E402
from p2pkv.vllm.leasebook import LeaseBook  # noqa: E402
from p2pkv.vllm.metadata import LeaseGrant, P2PKVMetadata, SavePlan  # noqa: E402
from p2pkv.vllm.scheduler import SchedulerSide  # noqa: E402
from p2pkv.vllm.worker import WorkerSide  # noqa: E402

from tests.test_vllm_scheduler import BLOCK, FakeDirectory, _step, request  # noqa: E402
from tests.test_vllm_worker import RecordingDirectory  # noqa: E402

# -- the scheduler side ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def leasing_side(free=(90, 100), can_save=True, producer=False, **kw) -> SchedulerSide:
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", **kw)
    return SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=1,
                         can_load=not producer, can_save=can_save, save_partial=producer,
                         directory=FakeDirectory(), free_blocks=lambda: free)


def finished(r, computed):
    r.num_computed_tokens = computed
    return r


def test_nothing_is_saved_as_a_leasing_request_runs():
    s = leasing_side(lease_s=5.0, producer=True)
    r = request("r", 3)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    assert _step(s, "r", 0, 3 * BLOCK, [7, 8, 9]) == []  # leased when it finishes instead


def _meta(s):
    return s.build_meta(SimpleNamespace(
        scheduled_new_reqs=[], num_scheduled_tokens={},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[])),
        lambda _: ([],))


def test_the_grant_names_the_chunks_this_instance_computed_with_their_blocks():
    s = leasing_side(lease_s=5.0, lease_pulls=1)
    r = request("r", 3)
    s.get_num_new_matched_tokens(r, BLOCK)  # chunk 0 is a local hit: whoever computed it
    finished(r, 3 * BLOCK)
    assert s.request_finished("r", status="FINISHED_STOPPED", block_ids=([7, 8, 9],))
    meta = _meta(s)
    assert meta.grants == [LeaseGrant("r", (SavePlan(r.block_hashes[1], (8,)),
                                             SavePlan(r.block_hashes[2], (9,))), 5.0, 1)]
    assert s.counters.leases_granted == 1
    assert _meta(s).grants == []  # sent once


def test_aborted_requests_and_instances_without_leases_free_at_once():
    s = leasing_side(lease_s=5.0)
    r = finished(request("r", 2), 2 * BLOCK)
    s.get_num_new_matched_tokens(r, 0)
    assert s.request_finished("r", status="FINISHED_ABORTED", block_ids=([1, 2],)) is False
    off = leasing_side()  # lease_s 0: today's behaviour
    r = finished(request("q", 2), 2 * BLOCK)
    off.get_num_new_matched_tokens(r, 0)
    assert _step(off, "q", 0, 2 * BLOCK, [1, 2]) != []  # saved as it completes
    assert off.request_finished("q", status="FINISHED_STOPPED", block_ids=([1, 2],)) is False
    decode = leasing_side(lease_s=5.0, can_save=False)
    r = finished(request("d", 2), 2 * BLOCK)
    decode.get_num_new_matched_tokens(r, 0)
    assert decode.request_finished("d", status="FINISHED_STOPPED", block_ids=([1, 2],)) is False


def test_a_producer_leases_the_partial_chunk_too():
    s = leasing_side(lease_s=5.0, producer=True)
    r = request("r", 2, extra_tokens=2)  # 2 full blocks and a partial one
    s.get_num_new_matched_tokens(r, 0)
    finished(r, 2 * BLOCK + 2)
    assert s.request_finished("r", status="FINISHED_LENGTH_CAPPED", block_ids=([4, 5, 6],))
    plans = _meta(s).grants[0].chunks
    assert [p.block_ids for p in plans] == [(4,), (5,), (6,)]


def test_past_the_caps_a_request_goes_to_the_store_without_a_lease():
    s = leasing_side(free=(60, 100), lease_s=5.0, lease_min_free_fraction=0.61)
    r = finished(request("r", 2), 2 * BLOCK)
    s.get_num_new_matched_tokens(r, 0)
    assert s.request_finished("r", status="FINISHED_STOPPED", block_ids=([1, 2],))
    assert _meta(s).grants[0].ttl_s == 0.0  # held one step: moved to the store, then freed
    assert s.counters.leases_refused == 1


def test_lease_book_caps_ends_the_oldest_under_pressure_and_forgets_on_finished_sending():
    clock = Clock()
    book = LeaseBook(5.0, max_fraction=0.25, min_free_fraction=0.1, clock=clock)
    assert book.ttl("a", 10, free=90, total=100) == 5.0
    clock.now = 1
    assert book.ttl("b", 10, free=80, total=100) == 5.0
    assert book.ttl("c", 10, free=70, total=100) == 0.0  # 30 > 25 % of the blocks
    assert book.held_blocks() == 20
    assert book.pressure(free=50, total=100) == []
    assert book.pressure(free=5, total=100) == ["a"]  # 5 + 10 coming back reach 10 %
    assert book.pressure(free=0, total=100) == []  # a's 10 blocks are on their way
    book.done(["a"])
    assert book.pressure(free=0, total=100) == ["b"]
    book.done(["b", "c"])
    assert len(book) == 0 and book.held_blocks() == 0


def test_memory_pressure_ends_leases_in_the_next_steps_metadata():
    free = [90]
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", lease_s=5.0)
    s = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=1,
                      can_load=True, can_save=True, directory=FakeDirectory(),
                      free_blocks=lambda: (free[0], 100))
    r = finished(request("r", 2), 2 * BLOCK)
    s.get_num_new_matched_tokens(r, 0)
    assert s.request_finished("r", status="FINISHED_STOPPED", block_ids=([1, 2],))
    assert _meta(s).end_leases == []
    free[0] = 3
    assert _meta(s).end_leases == ["r"]
    assert s.counters.leases_ended_early == 1
    s.leases_done({"r"})
    assert _meta(s).end_leases == []


# -- a worker rank serving leased blocks -------------------------------------------------


def make_worker(directory, blocks=8, **kw):
    caches = {f"l{i}": torch.randn(blocks, 2, 4, 8) for i in range(3)}
    kw = {"store_gib": 0.001, **kw}
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", pull_timeout_s=2, transport="tcp",
                             **kw)
    w = WorkerSide(config, instance=InstanceId("i"), namespace=Namespace("ns"), chunk_blocks=2,
                   transport=PeerTransport(), directory=directory)
    w.register_kv_caches(KVLayout.from_kv_caches(caches))
    return w, caches


def sent_back(w: WorkerSide, timeout_s: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while not (out := w.take_finished_sending()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return out


def chunk_bytes(caches, block_ids) -> bytes:
    return b"".join(caches[n][b].numpy().tobytes() for b in block_ids for n in caches)


def pull(transport, address, key, nbytes):
    buf = bytearray(nbytes)
    got = transport.pull(address, [PullItem(key, (memoryview(buf),))], 2.0)[0]
    return got, bytes(buf)


def test_a_leased_chunk_is_published_served_in_place_and_moved_to_the_store_at_the_end():
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=30.0, lease_pulls=1)
    key = ChunkKey(b"k" * 32)
    holder.start_loads(P2PKVMetadata(grants=[LeaseGrant("r", (SavePlan(key, (5, 2)),), 30.0,
                                                        1)]))
    assert d.published[-1] == ([key], [])
    assert holder.take_finished_sending() == set()  # held: vLLM must not free the blocks
    puller = PeerTransport()
    want = chunk_bytes(caches, (5, 2))
    got, data = pull(puller, d.registered[0], key, len(want))
    assert got.outcome is Outcome.OK and data == want
    # one pull of every chunk ends the lease: handed back (once the server's read is
    # unpinned, just after the bytes left), copied into the store
    assert sent_back(holder) == {"r"}
    assert holder.wait_saved(5.0)
    got, data = pull(puller, d.registered[0], key, len(want))
    assert got.outcome is Outcome.OK and data == want  # now from the store
    c = holder._leases.counters
    assert (c.leases_granted, c.chunks_served_leased, c.chunks_moved_to_store) == (1, 1, 1)
    puller.close()
    holder.shutdown()


def test_a_lease_ended_by_its_pulls_wakes_the_engines_idle_wait():
    """With the EngineCore waiting out idle steps (``meta.idle_wait``) the rank does not wait
    in ``get_finished``, and pings the wait's port once the lease can be handed back."""
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=30.0, lease_pulls=1)
    wake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wake.bind(("127.0.0.1", 0))
    wake.settimeout(5.0)
    key = ChunkKey(b"w" * 32)
    holder.start_loads(P2PKVMetadata(
        grants=[LeaseGrant("r", (SavePlan(key, (5, 2)),), 30.0, 1)], idle_step=True,
        idle_wait=True, wake_port=wake.getsockname()[1]))
    took = []
    for _ in range(5):
        t0 = time.monotonic()
        assert holder.take_finished_sending() == set()
        took.append(time.monotonic() - t0)
    # NOTE: min of 5: a loaded host may stall one call; a rank that waits takes 20 ms each
    assert min(took) < 0.01, f"the EngineCore waits; the rank must not ({took})"
    puller = PeerTransport()
    got, _ = pull(puller, d.registered[0], key, len(chunk_bytes(caches, (5, 2))))
    assert got.outcome is Outcome.OK
    assert wake.recv(64), "the engine's idle wait should have been woken"
    assert holder.take_finished_sending() == {"r"}
    wake.close()
    puller.close()
    holder.shutdown()


def test_an_expired_lease_serves_nothing_and_is_handed_back():
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=0.2)
    key = ChunkKey(b"e" * 32)
    holder.start_loads(P2PKVMetadata(grants=[LeaseGrant("r", (SavePlan(key, (1, 3)),), 0.2)]))
    time.sleep(0.3)
    t = PeerTransport()
    got, _ = pull(t, d.registered[0], key, len(chunk_bytes(caches, (1, 3))))
    assert got.outcome is Outcome.MISSING  # expired: no read of the blocks any more
    assert sent_back(holder) == {"r"}
    assert holder.wait_saved(5.0) and key in holder._store  # the durable tier has it
    t.close()
    holder.shutdown()


def test_a_grant_with_no_lease_is_handed_back_at_once_and_stored():
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=30.0)
    key = ChunkKey(b"z" * 32)
    holder.start_loads(P2PKVMetadata(grants=[LeaseGrant("r", (SavePlan(key, (0, 1)),), 0.0)]))
    assert sent_back(holder) == {"r"}
    assert holder.wait_saved(5.0)
    assert key in holder._store
    holder.shutdown()


def test_reused_blocks_are_never_served_as_the_old_chunk():
    """vLLM reuses a block the moment the rank hands the request back; pullers hammer the key
    meanwhile: each gets the old bytes or MISSING, never the new ones (nor a mix)."""
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=30.0, store_gib=1e-9)  # a store of one slot
    holder._store.reserve(ChunkKey(b"\0" * 32))  # ...kept busy: the chunk cannot move there
    key = ChunkKey(b"h" * 32)
    blocks = (4, 6)
    old = chunk_bytes(caches, blocks)
    address = d.registered[0]
    holder.start_loads(P2PKVMetadata(grants=[LeaseGrant("r", (SavePlan(key, blocks),), 30.0)]))
    bad: list[str] = []
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def hammer():
        t = PeerTransport()
        while not stop.is_set():
            got, data = pull(t, address, key, len(old))
            outcomes.append(got.outcome)
            if got.outcome is Outcome.OK and data != old:
                bad.append("new bytes served as the old chunk")
        t.close()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    holder.start_loads(P2PKVMetadata(end_leases=["r"]))  # memory pressure
    deadline = time.monotonic() + 5
    while "r" not in holder.take_finished_sending():
        assert time.monotonic() < deadline, "the lease was never handed back"
    for n in caches:  # vLLM reuses the blocks at once
        for b in blocks:
            caches[n][b].copy_(torch.randn_like(caches[n][b]))
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert not bad
    assert Outcome.OK in outcomes and outcomes[-1] is Outcome.MISSING
    assert holder._leases.counters.lease_stale == 0
    assert d.published[-1] == ([], [key])  # not in the store: unpublished
    holder.shutdown()


def test_bytes_changed_under_a_lease_are_refused_by_the_stale_check():
    d = RecordingDirectory()
    holder, caches = make_worker(d, lease_s=30.0)
    key = ChunkKey(b"s" * 32)
    holder.start_loads(P2PKVMetadata(grants=[LeaseGrant("r", (SavePlan(key, (2, 3)),), 30.0)]))
    t = PeerTransport()
    n = len(chunk_bytes(caches, (2, 3)))
    assert pull(t, d.registered[0], key, n)[0].outcome is Outcome.OK
    caches["l1"][3].add_(1.0)  # a bug would do this: the blocks changed while leased
    assert pull(t, d.registered[0], key, n)[0].outcome is Outcome.MISSING
    assert holder._leases.counters.lease_stale == 1
    t.close()
    holder.shutdown()


def test_cut_selects_byte_ranges_across_pieces():
    from p2pkv.transport.selection import cut

    data = bytes(range(20))
    views = [memoryview(data[0:5]), memoryview(data[5:12]), memoryview(data[12:20])]
    ranges = [(0, 2), (4, 3), (11, 6), (19, 1)]
    assert b"".join(bytes(v) for v in cut(views, ranges)) == b"".join(
        data[o:o + n] for o, n in ranges)
    with pytest.raises(ValueError):
        cut(views, [(18, 5)])
