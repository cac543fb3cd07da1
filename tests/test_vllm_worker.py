"""WorkerSide over a real TCP transport on loopback, with a recording directory stand-in."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.keys import ChunkKey, InstanceId, Namespace  # noqa: E402
from p2pkv.transport.peer import PeerTransport  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.layout import KVLayout  # noqa: E402
from p2pkv.slices import KVSlice, tp_slices  # noqa: E402
from p2pkv.vllm.metadata import ChunkLoad, LoadPlan, P2PKVMetadata, SavePlan  # noqa: E402
from p2pkv.vllm.sources import Source  # noqa: E402
from p2pkv.vllm.worker import WorkerSide  # noqa: E402

WHOLE = KVSlice.whole(2, 3)  # make_worker's caches: 2 KV heads, 3 layers


def load(req_id, address, chunks, rank_sources=None) -> LoadPlan:
    """A load from one whole-model holder (TP 1 to TP 1), or from ``rank_sources``."""
    return LoadPlan(req_id, tuple(chunks), rank_sources or (
        (Source(address, InstanceId("h"), WHOLE, WHOLE),),))


@dataclass
class RecordingDirectory:
    """Stands in for DirectoryClient (which keeps the registration alive by itself)."""

    registered: list = field(default_factory=list)
    registrations: list = field(default_factory=list)
    published: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    unregistered: bool = False

    def register(self, registration, wait_connected_s=0.0):
        self.registered.append(registration.address)
        self.registrations.append(registration)

    leased: list = field(default_factory=list)  # (keys, lease_s) published as leased

    def publish(self, added=(), removed=(), lease_s=0.0):
        self.published.append((list(added), list(removed)))
        if lease_s > 0:
            self.leased.append((list(added), lease_s))

    def report(self, counters):
        self.reports.append(dict(counters))

    def unregister(self):
        self.unregistered = True

    def close(self):
        pass


def make_worker(directory, blocks=8, heads=2, **kw):
    caches = {f"l{i}": torch.randn(blocks, heads, 4, 8) for i in range(3)}
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", store_gib=0.001, pull_timeout_s=2)
    w = WorkerSide(config, instance=InstanceId("i"), namespace=Namespace("ns"), chunk_blocks=2,
                   transport=PeerTransport(), directory=directory, **kw)
    w.register_kv_caches(KVLayout.from_kv_caches(caches))
    return w, caches


def wait_finished(w: WorkerSide, req_id: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while req_id not in w.take_finished_recving():
        assert time.monotonic() < deadline, "load never finished"
        time.sleep(0.01)


def test_saved_chunk_is_published_and_pulled_byte_exact_into_other_blocks():
    d = RecordingDirectory()
    holder, h_caches = make_worker(d)
    puller, p_caches = make_worker(RecordingDirectory())
    key = ChunkKey(b"k" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
    assert holder.wait_saved(5.0)
    assert d.published[-1] == ([key], [])
    address = d.registered[0]
    puller.start_loads(P2PKVMetadata(loads=[load("r", address, (ChunkLoad(key, (0, 7)),))]))
    wait_finished(puller, "r")
    assert puller.take_failed_blocks() == set()
    for name in h_caches:
        assert torch.equal(p_caches[name][0], h_caches[name][5])
        assert torch.equal(p_caches[name][7], h_caches[name][2])
    assert puller.counters.chunks_pulled == 1
    assert puller.counters.bytes_pulled == 2 * 3 * 2 * 4 * 8 * 4
    holder.shutdown()
    puller.shutdown()


def test_missing_chunk_and_dead_peer_report_their_blocks_as_failed():
    d = RecordingDirectory()
    holder, _ = make_worker(d)
    puller, _ = make_worker(RecordingDirectory())
    missing = ChunkLoad(ChunkKey(b"m" * 32), (None, 3))  # first block was a local hit
    puller.start_loads(P2PKVMetadata(loads=[load("r1", d.registered[0], (missing,))]))
    wait_finished(puller, "r1")
    assert puller.take_failed_blocks() == {3}
    holder.shutdown()  # its server is gone: connection refused
    dead = ChunkLoad(ChunkKey(b"k" * 32), (4, 5))
    puller.start_loads(P2PKVMetadata(loads=[load("r2", d.registered[0], (dead,))]))
    wait_finished(puller, "r2")
    assert puller.take_failed_blocks() == {4, 5}
    assert puller.counters.chunks_failed == 1 and puller.counters.chunks_missing == 1
    puller.shutdown()


def test_an_idle_step_waits_for_a_load_in_flight_and_a_forward_step_does_not():
    """A step without a forward pass (``idle_step``) with a load in flight: get_finished waits
    (bounded) and is woken by the load's end; a step with a forward pass never waits."""
    import p2pkv.vllm.worker as worker_mod

    d = RecordingDirectory()
    holder, _ = make_worker(d)
    puller, _ = make_worker(RecordingDirectory())
    key = ChunkKey(b"k" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
    assert holder.wait_saved(5.0)
    gate = threading.Event()
    real = puller._pull_part

    def slow_pull(plan, source, *args):
        gate.wait(5.0)
        return real(plan, source, *args)

    puller._pull_part = slow_pull
    puller.start_loads(P2PKVMetadata(loads=[load("r", d.registered[0], (ChunkLoad(key, (0, 7)),))],
                                     idle_step=True))
    t0 = time.monotonic()
    assert puller.take_finished_recving() == set()  # nothing ended: waited the whole bound
    assert time.monotonic() - t0 >= 0.8 * worker_mod.IDLE_STEP_WAIT_S
    puller.start_loads(P2PKVMetadata())  # a forward step: no waiting
    t0 = time.monotonic()
    assert puller.take_finished_recving() == set()
    assert time.monotonic() - t0 < worker_mod.IDLE_STEP_WAIT_S / 2
    puller.start_loads(P2PKVMetadata(idle_step=True))
    threading.Timer(0.005, gate.set).start()
    got: set[str] = set()
    deadline = time.monotonic() + 5
    while "r" not in got and time.monotonic() < deadline:
        got |= puller.take_finished_recving()
    assert "r" in got and puller.take_failed_blocks() == set()
    holder.shutdown()
    puller.shutdown()


def test_worker_registers_once_publishes_deltas_and_unregisters():
    d = RecordingDirectory()
    w, _ = make_worker(d)
    keys = [ChunkKey(bytes([i]) * 32) for i in range(2)]
    w.save(P2PKVMetadata(saves=[SavePlan(keys[0], (0, 1))]))
    w.save(P2PKVMetadata(saves=[SavePlan(keys[1], (2, 3))]))
    assert w.wait_saved(5.0)
    assert len(d.registered) == 1
    assert d.published == [([keys[0]], []), ([keys[1]], [])]
    w.take_finished_recving()
    assert d.reports and d.reports[-1]["chunks_saved"] == 2
    w.shutdown()
    assert d.unregistered


def tp_workers(tp: int, heads: int = 4, **kw):
    """The worker ranks of one instance at TP ``tp`` (model: ``heads`` KV heads, 3 layers)."""
    slices = tp_slices(num_kv_heads=heads, num_layers=3, tp_size=tp)
    out = []
    for rank, sl in enumerate(slices):
        d = RecordingDirectory()
        w, caches = make_worker(d, heads=sl.heads, rank=rank, slice=sl,
                                saves=slices.index(sl) == rank, **kw)
        out.append((w, caches, d, sl))
    return out


def sources_for(holders, wanted):
    from p2pkv.vllm.sources import plan_sources

    from p2pkv.directory.protocol import Holder  # a lookup's holder, as the directory returns it

    plan = plan_sources([Holder(InstanceId("h"), d.registered[0], 1, "e", sl)
                         for _, _, d, sl in holders if d.registered],
                        [sl for *_, sl in wanted])
    assert plan is not None
    return plan.per_rank


@pytest.mark.parametrize("holder_tp, puller_tp", [(2, 1), (1, 2), (2, 2), (1, 4)])
def test_heterogeneous_tp_puts_every_head_where_the_holder_had_it(holder_tp, puller_tp):
    """A chunk saved by a TP ``holder_tp`` instance, pulled by each rank of a TP ``puller_tp``
    one: puller head h of every (block, layer) equals the holder's head h."""
    holders = tp_workers(holder_tp)
    pullers = tp_workers(puller_tp)
    key = ChunkKey(b"t" * 32)
    for w, *_ in holders:
        w.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
        assert w.wait_saved(5.0)
    sources = sources_for(holders, pullers)
    for w, *_ in pullers:
        w.start_loads(P2PKVMetadata(loads=[load("r", "", (ChunkLoad(key, (0, 7)),), sources)]))
    for w, *_ in pullers:
        wait_finished(w, "r")
        assert w.take_failed_blocks() == set()
    for _, p_caches, _, p_slice in pullers:
        for _, h_caches, _, h_slice in holders:
            common = p_slice.intersect(h_slice)
            if common is None:
                continue
            ph = slice(common.head_start - p_slice.head_start, common.head_end - p_slice.head_start)
            hh = slice(common.head_start - h_slice.head_start, common.head_end - h_slice.head_start)
            for name in h_caches:
                assert torch.equal(p_caches[name][0][ph], h_caches[name][5][hh])
                assert torch.equal(p_caches[name][7][ph], h_caches[name][2][hh])
    per_rank = 2 * 3 * 4 * 8 * 4  # blocks x layers x block_size x 2*head_size/2 x fp32, per head
    assert [w.counters.bytes_pulled for w, *_ in pullers] == [per_rank * sl.heads
                                                             for *_, sl in pullers]
    for w, *_ in holders + pullers:
        w.shutdown()


def test_replicated_heads_only_the_lowest_rank_saves_and_registers():
    ranks = tp_workers(4, heads=2)  # 2 KV heads at TP 4: ranks 0,1 hold head 0; 2,3 head 1
    assert [sl.head_start for *_, sl in ranks] == [0, 0, 1, 1]
    assert [bool(d.registered) for _, _, d, _ in ranks] == [True, False, True, False]
    key = ChunkKey(b"r" * 32)
    for w, *_ in ranks:
        w.save(P2PKVMetadata(saves=[SavePlan(key, (1, 2))]))
        assert w.wait_saved(5.0)
    assert [len(d.published) for _, _, d, _ in ranks] == [1, 0, 1, 0]
    assert ranks[0][2].registrations[0].slice == ranks[0][3]
    for w, *_ in ranks:
        w.shutdown()


def test_a_dead_holder_rank_fails_the_chunk_on_the_ranks_that_need_it():
    holders = tp_workers(2)
    puller = tp_workers(1)
    key = ChunkKey(b"d" * 32)
    for w, *_ in holders:
        w.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
        assert w.wait_saved(5.0)
    sources = sources_for(holders, puller)
    holders[1][0].shutdown()  # rank 1's server is gone: half of every chunk is unreachable
    w = puller[0][0]
    w.start_loads(P2PKVMetadata(loads=[load("r", "", (ChunkLoad(key, (0, 7)),), sources)]))
    wait_finished(w, "r")
    assert w.take_failed_blocks() == {0, 7}
    assert w.counters.chunks_pulled == 0 and w.counters.chunks_failed == 1
    holders[0][0].shutdown()
    w.shutdown()


def test_saves_leave_the_step_at_once_and_the_fence_makes_reused_blocks_safe():
    """Issue 17: save() only queues the copies (off the step's critical path); once fence()
    returns, vLLM may overwrite the blocks (a reused block) without changing what is stored."""
    d = RecordingDirectory()
    holder, h_caches = make_worker(d)
    puller, p_caches = make_worker(RecordingDirectory())
    key = ChunkKey(b"f" * 32)
    before = {name: t[4].clone() for name, t in h_caches.items()}
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (4, 1))]))
    # what the connector does at the start of the next execute_model, whose step reuses 4
    holder.fence(P2PKVMetadata(new_blocks=frozenset({4, 6})))
    for t in h_caches.values():
        t[4].zero_()  # the next step reuses block 4
    assert holder.wait_saved(5.0)
    assert d.published[-1] == ([key], [])
    puller.start_loads(P2PKVMetadata(loads=[load("r", d.registered[0],
                                                 (ChunkLoad(key, (6, 7)),))]))
    wait_finished(puller, "r")
    assert puller.take_failed_blocks() == set()
    for name in h_caches:
        assert torch.equal(p_caches[name][6], before[name])
    holder.shutdown()
    puller.shutdown()


def test_the_fence_waits_only_for_copies_of_blocks_the_step_writes():
    from p2pkv.store import ChunkStore
    from p2pkv.vllm.saver import HostSaver

    caches = {f"l{i}": torch.randn(8, 2, 4, 8) for i in range(3)}
    layout = KVLayout.from_kv_caches(caches)
    store = ChunkStore(layout.chunk_bytes(2), 4)
    gate = threading.Event()
    saved = []

    def on_saved(keys):
        saved.extend(keys)

    saver = HostSaver(layout, store, on_saved)
    real_copy = layout.copy_out
    # hold the copy until the gate opens (KVLayout is frozen: wrap the saver's reference)
    saver._layout = SimpleNamespace(copy_out=lambda ids, view: (gate.wait(5), real_copy(ids, view)))
    assert saver.save([(ChunkKey(b"a" * 32), (0, 1))]) == 1
    assert saver.fence({5, 6}) is False  # the step writes other blocks: no wait
    threading.Timer(0.2, gate.set).start()
    t0 = time.monotonic()
    assert saver.fence({1}) is True  # block 1 is still being read
    assert time.monotonic() - t0 >= 0.15
    assert saver.wait_saved(5.0) and saved == [ChunkKey(b"a" * 32)]
    assert saver.fence({1}) is False
    saver.close()


def test_copies_wait_for_the_forward_pass_but_never_for_more_than_one():
    """Issue 17: the save thread copies between this worker's forward passes (its copies
    would stall the pass's OpenMP threads), and a chunk waits for one whole pass at most."""
    from p2pkv.store import ChunkStore
    from p2pkv.vllm.saver import HostSaver

    caches = {f"l{i}": torch.randn(8, 2, 4, 8) for i in range(3)}
    layout = KVLayout.from_kv_caches(caches)
    saver = HostSaver(layout, ChunkStore(layout.chunk_bytes(2), 4), lambda keys: None)
    real_copy = layout.copy_out
    copied: list[tuple[int, ...]] = []
    saver._layout = SimpleNamespace(
        copy_out=lambda ids, view: (copied.append(tuple(ids)), real_copy(ids, view)))

    def wait_copied(n: int) -> bool:
        deadline = time.monotonic() + 5.0
        while len(copied) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(copied) >= n

    saver.forward_begins()
    assert saver.save([(ChunkKey(b"a" * 32), (0, 1))]) == 1
    time.sleep(0.3)
    assert copied == []  # held back while the pass runs
    saver.forward_ends()
    assert wait_copied(1)
    saver.forward_begins()
    assert saver.save([(ChunkKey(b"b" * 32), (2, 3))]) == 1
    time.sleep(0.2)
    assert len(copied) == 1
    saver.forward_ends()
    saver.forward_begins()  # the next pass begins at once: the chunk waited for one already
    assert wait_copied(2)
    saver.forward_ends()
    assert saver.wait_saved(5.0)
    saver.close()


def test_the_servers_health_is_reported_with_the_counters():
    d = RecordingDirectory()
    w, _ = make_worker(d)
    try:
        w.take_finished_recving()
        assert d.reports[-1]["server_alive"] == 1 and d.reports[-1]["server_saturated"] == 0
    finally:
        w.shutdown()


def test_whole_pulls_become_planner_samples_and_its_status_joins_the_report():
    import dataclasses

    d = RecordingDirectory()
    holder, _ = make_worker(d)
    puller_dir = RecordingDirectory()
    puller, _ = make_worker(puller_dir)
    key = ChunkKey(b"k" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
    assert holder.wait_saved(5.0)
    good = dataclasses.replace(load("r", d.registered[0], (ChunkLoad(key, (0, 7)),)), peer="H")
    bad = dataclasses.replace(load("m", d.registered[0], (ChunkLoad(ChunkKey(b"m" * 32),
                                                                    (1, 2)),)), peer="H")
    puller.start_loads(P2PKVMetadata(loads=[good, bad],
                                     planner_status={"planner_pulls": 2}))
    done: set[str] = set()
    deadline = time.monotonic() + 5
    while done != {"r", "m"}:
        assert time.monotonic() < deadline, done
        done |= puller.take_finished_recving()
        time.sleep(0.01)
    (sample,) = puller.take_worker_meta().pulls  # the failed load teaches nothing
    assert sample.peer == "H" and sample.nbytes == 2 * 3 * 2 * 4 * 8 * 4 and sample.seconds > 0
    assert puller.take_worker_meta().pulls == []
    assert puller_dir.reports[-1]["planner_pulls"] == 2
    holder.shutdown()
    puller.shutdown()


def test_the_save_thread_prefaults_free_slots_only_while_idle():
    """Issue 17: while nothing is queued and no forward pass runs, the save thread faults in
    the store slots the next saves will write (their first write no longer page-faults), and
    it stops when a pass begins; the saved bytes are unchanged."""
    from p2pkv.store import ChunkStore
    from p2pkv.vllm.saver import HostSaver

    caches = {f"l{i}": torch.randn(8, 2, 16, 64) for i in range(3)}
    layout = KVLayout.from_kv_caches(caches)
    store = ChunkStore(layout.chunk_bytes(2), 6, shared=True)
    saved: list[ChunkKey] = []
    saver = HostSaver(layout, store, saved.extend)

    def wait_for(cond) -> bool:
        deadline = time.monotonic() + 5.0
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.01)
        return cond()

    assert wait_for(lambda: store.untouched_ahead(6) == [])
    assert saver.prefaulted == 6
    key = ChunkKey(b"p" * 32)
    saver.forward_begins()
    assert saver.save([(key, (3, 4))]) == 1
    saver.forward_ends()
    assert saver.wait_saved(5.0) and saved == [key]
    p = store.pin(key)
    assert p is not None
    assert bytes(p.view) == b"".join(t[b].numpy().tobytes() for b in (3, 4)
                                     for t in caches.values())
    store.unpin(p)
    saver.close()
    store.close()


def test_no_prefault_while_a_forward_pass_runs():
    from p2pkv.store import ChunkStore
    from p2pkv.vllm.saver import HostSaver

    caches = {f"l{i}": torch.randn(8, 2, 16, 64) for i in range(3)}
    layout = KVLayout.from_kv_caches(caches)
    store = ChunkStore(layout.chunk_bytes(2), 4)
    real_prefault = store.prefault

    def slow_prefault(*args, **kwargs):  # tiny slots fault in at once: slow each down so the
        time.sleep(0.2)  # thread cannot finish them all before forward_begins under load
        return real_prefault(*args, **kwargs)

    store.prefault = slow_prefault
    saver = HostSaver(layout, store, lambda keys: None)
    saver.forward_begins()  # races the thread's first prefault: one slot at most
    time.sleep(0.3)
    first = saver.prefaulted
    time.sleep(0.3)
    assert saver.prefaulted == first <= 1
    saver.forward_ends()
    deadline = time.monotonic() + 5.0
    while saver.prefaulted < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert saver.prefaulted == 4
    saver.close()
