"""Layer-wise loads (``p2pkv.vllm.layerwise``) over real transports on loopback: the bytes land
where a whole-chunk pull puts them, each layer waits only for its group, failures fail the
chunk's blocks (never a half-written chunk reported good)."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.keys import ChunkKey, InstanceId, Namespace  # noqa: E402
from p2pkv.slices import KVSlice  # noqa: E402
from p2pkv.transport.base import Outcome, PullResult  # noqa: E402
from p2pkv.transport.choose import make_transport  # noqa: E402
from p2pkv.transport.peer import PeerTransport  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.layerwise import LayerwiseLoads, layer_groups  # noqa: E402
from p2pkv.vllm.layout import KVLayout  # noqa: E402
from p2pkv.vllm.metadata import ChunkLoad, LoadPlan, P2PKVMetadata, SavePlan  # noqa: E402
from p2pkv.vllm.sources import Source  # noqa: E402
from p2pkv.vllm.worker import WorkerSide  # noqa: E402
from tests.test_vllm_worker import RecordingDirectory, sources_for, tp_workers  # noqa: E402

LAYERS = 3


def worker(directory, transport=None, heads=2, groups=3, **kw):
    caches = {f"l{i}": torch.randn(8, heads, 4, 8) for i in range(LAYERS)}
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", store_gib=0.001, pull_timeout_s=2,
                             load_mode="layerwise", layer_groups=groups)
    w = WorkerSide(config, instance=InstanceId("i"), namespace=Namespace("ns"), chunk_blocks=2,
                   transport=transport or PeerTransport(), directory=directory, **kw)
    w.register_kv_caches(KVLayout.from_kv_caches(caches))
    return w, caches


def layerwise_plan(req_id, sources, chunks) -> LoadPlan:
    return LoadPlan(req_id, tuple(chunks), sources, layerwise=True)


def whole(address, heads=2):
    sl = KVSlice.whole(heads, LAYERS)
    return ((Source(address, InstanceId("h"), sl, sl),),)


def run_step(w: WorkerSide, meta: P2PKVMetadata) -> set[int]:
    """What vLLM does in a step with a synchronous load: start, every layer waits, then the
    step's saves and its error report."""
    w.start_loads(meta)
    for i in range(LAYERS):
        w.wait_for_layer_load(f"l{i}")
    w.save(P2PKVMetadata())
    assert w.take_finished_recving() == set()  # a synchronous load is never "finished"
    return w.take_failed_blocks()


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(30, 4) == [range(0, 7), range(7, 15), range(15, 22), range(22, 30)]
    assert layer_groups(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]
    assert layer_groups(5, 1) == [range(0, 5)]


@pytest.mark.parametrize("kind", ["tcp", "shm"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_layerwise_load_is_byte_exact(kind, groups):
    d = RecordingDirectory()
    holder, h_caches = worker(d, make_transport(kind, bind_host="127.0.0.1", store_bytes=1 << 20))
    puller, p_caches = worker(RecordingDirectory(), make_transport(kind, bind_host="127.0.0.1",
                                                                   store_bytes=1 << 20),
                              groups=groups)
    keys = [ChunkKey(bytes([i]) * 32) for i in range(2)]
    holder.save(P2PKVMetadata(saves=[SavePlan(keys[0], (5, 2)), SavePlan(keys[1], (3, 4))]))
    assert holder.wait_saved(5.0)
    chunks = (ChunkLoad(keys[0], (0, 7)), ChunkLoad(keys[1], (None, 6)))  # block 3 was local
    failed = run_step(puller, P2PKVMetadata(loads=[layerwise_plan("r", whole(d.registered[0]),
                                                                  chunks)]))
    assert failed == set()
    for name in h_caches:
        assert torch.equal(p_caches[name][0], h_caches[name][5])
        assert torch.equal(p_caches[name][7], h_caches[name][2])
        assert torch.equal(p_caches[name][6], h_caches[name][4])
    c = puller.counters
    assert (c.loads, c.loads_layerwise, c.chunks_pulled, c.chunks_failed) == (1, 1, 2, 0)
    assert getattr(puller._transport.counters, kind) >= 1  # the path under test ran
    holder.shutdown()
    puller.shutdown()


def test_missing_chunk_and_dead_holder_fail_the_chunks_blocks():
    d = RecordingDirectory()
    holder, _ = worker(d)
    puller, _ = worker(RecordingDirectory())
    key = ChunkKey(b"k" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (1, 2))]))
    assert holder.wait_saved(5.0)
    gone = ChunkLoad(ChunkKey(b"m" * 32), (None, 3))
    plan = layerwise_plan("r1", whole(d.registered[0]), (ChunkLoad(key, (4, 5)), gone))
    assert run_step(puller, P2PKVMetadata(loads=[plan])) == {3}
    holder.shutdown()
    plan = layerwise_plan("r2", whole(d.registered[0]), (ChunkLoad(key, (6, 7)),))
    assert run_step(puller, P2PKVMetadata(loads=[plan])) == {6, 7}
    c = puller.counters
    assert (c.chunks_pulled, c.chunks_missing, c.chunks_failed) == (1, 1, 1)
    puller.shutdown()


def test_tp2_holder_into_tp1_layerwise_puts_every_head_in_place():
    holders = tp_workers(2)
    caches = {f"l{i}": torch.randn(8, 4, 4, 8) for i in range(LAYERS)}
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", store_gib=0.001, pull_timeout_s=2,
                             load_mode="layerwise", layer_groups=2)
    puller = WorkerSide(config, instance=InstanceId("p"), namespace=Namespace("ns"),
                        chunk_blocks=2, transport=PeerTransport(),
                        directory=RecordingDirectory())
    puller.register_kv_caches(KVLayout.from_kv_caches(caches))
    key = ChunkKey(b"t" * 32)
    for w, *_ in holders:
        w.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
        assert w.wait_saved(5.0)
    sources = sources_for(holders, [(None, None, None, KVSlice.whole(4, LAYERS))])
    plan = layerwise_plan("r", sources, (ChunkLoad(key, (0, 7)),))
    assert run_step(puller, P2PKVMetadata(loads=[plan])) == set()
    for _, h_caches, _, sl in holders:
        heads = slice(sl.head_start, sl.head_end)
        for name in h_caches:
            assert torch.equal(caches[name][0][heads], h_caches[name][5])
            assert torch.equal(caches[name][7][heads], h_caches[name][2])
    for w, *_ in holders:
        w.shutdown()
    puller.shutdown()


class GatedTransport(PeerTransport):
    """Lands stage 0, then holds the later stages until ``release`` is set."""

    def __init__(self, fail_late: bool = False) -> None:
        super().__init__()
        self.release = threading.Event()
        self.fail_late = fail_late

    def pull_staged(self, address, stages, timeout_s, on_stage, epoch=0, holder_key=None):
        out = [[PullResult(i.key, Outcome.OK) for i in stages[0]]]
        on_stage(0)
        self.release.wait(10)
        for s in range(1, len(stages)):
            out.append([PullResult(i.key, Outcome.FAILED if self.fail_late else Outcome.OK,
                                   "late failure") for i in stages[s]])
            on_stage(s)
        return out


@pytest.mark.parametrize("fail_late", [False, True])
def test_layer_zero_runs_while_later_layers_are_in_flight(fail_late):
    transport = GatedTransport(fail_late)
    puller, _ = worker(RecordingDirectory(), transport, groups=3)
    key = ChunkKey(b"g" * 32)
    puller.start_loads(P2PKVMetadata(loads=[layerwise_plan("r", whole("127.0.0.1:1"),
                                                           (ChunkLoad(key, (1, 2)),))]))
    t0 = time.monotonic()
    puller.wait_for_layer_load("l0")  # its group landed: no wait for the gated ones
    assert time.monotonic() - t0 < 1.0
    waited = threading.Event()
    t = threading.Thread(target=lambda: (puller.wait_for_layer_load("l1"), waited.set()))
    t.start()
    assert not waited.wait(0.3), "layer 1 ran before its group landed"
    transport.release.set()
    assert waited.wait(5.0)
    t.join()
    puller.wait_for_layer_load("l2")
    puller.save(P2PKVMetadata())
    assert puller.take_failed_blocks() == ({1, 2} if fail_late else set())
    puller.shutdown()


def test_a_group_past_its_deadline_fails_the_load_even_if_it_lands_later():
    transport = GatedTransport()
    puller, _ = worker(RecordingDirectory(), transport, groups=3)
    loads = puller._layerwise
    assert isinstance(loads, LayerwiseLoads)
    loads._timeout_s = 0.1  # the layer gives up waiting after 0.1 s + 1 s margin
    key = ChunkKey(b"g" * 32)
    puller.start_loads(P2PKVMetadata(loads=[layerwise_plan("r", whole("127.0.0.1:1"),
                                                           (ChunkLoad(key, (1, 2)),))]))
    puller.wait_for_layer_load("l1")  # gives up: the layer runs without its group
    transport.release.set()  # the bytes land afterwards, reported OK by the transport
    puller.save(P2PKVMetadata())
    assert puller.take_failed_blocks() == {1, 2}
    puller.shutdown()


# -- the scheduler side's choice and its save hold -----------------------------------------

def scheduler(replies, **kw):
    from p2pkv.vllm.scheduler import SchedulerSide
    from tests.test_vllm_scheduler import BLOCK, FakeDirectory

    config = ConnectorConfig(directory="tcp://127.0.0.1:1", load_mode="layerwise")
    return SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=1,
                         can_load=True, can_save=True, directory=FakeDirectory(replies),
                         layerwise=True, **kw)


def req(req_id, blocks, extra):
    from types import SimpleNamespace

    from tests.test_vllm_scheduler import BLOCK

    prompt = list(range(blocks * BLOCK + extra))
    return SimpleNamespace(request_id=req_id, block_hashes=[bytes([i]) * 32
                                                            for i in range(blocks)],
                           prompt_token_ids=prompt, num_tokens=len(prompt))


def test_a_load_short_of_the_last_token_is_layerwise_a_whole_prompt_load_stays_async():
    from tests.test_vllm_scheduler import BLOCK, reply

    s = scheduler([reply(3), reply(3)])
    short = req("short", 3, extra=2)  # 3 full chunks held, 2 more tokens to compute
    assert s.get_num_new_matched_tokens(short, 0) == (3 * BLOCK, False)  # synchronous
    whole_prompt = req("whole", 3, extra=0)  # every token held: vLLM must recompute one
    assert s.get_num_new_matched_tokens(whole_prompt, 0) == (3 * BLOCK, True)
    s.update_state_after_alloc(short, ([1, 2, 3, 4],), 3 * BLOCK)
    s.update_state_after_alloc(whole_prompt, ([5, 6, 7],), 3 * BLOCK)
    meta = s.build_meta(_step([]), lambda _: ([],))
    assert [(p.req_id, p.layerwise) for p in meta.loads] == [("short", True), ("whole", False)]


def _step(progress, scheduled=None):
    """A SchedulerOutput with cached requests ``progress`` [(req_id, computed)]."""
    from types import SimpleNamespace

    return SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens=scheduled or {},
                           scheduled_cached_reqs=SimpleNamespace(
                               req_ids=[r for r, _ in progress],
                               num_computed_tokens=[c for _, c in progress]))


def test_chunks_computed_in_the_load_step_and_the_next_are_never_saved():
    from tests.test_vllm_scheduler import BLOCK, reply

    s = scheduler([reply(2)])
    r = req("r", 8, extra=1)  # 2 chunks held; the rest is computed over several steps
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BLOCK, False)
    blocks = list(range(10, 19))
    s.update_state_after_alloc(r, (blocks,), 2 * BLOCK)
    # the load step computes chunks 2-3, the next step chunk 4: both held back
    assert s.build_meta(_step([("r", 2 * BLOCK)], {"r": 2 * BLOCK}), lambda _: (blocks,)).saves == []
    assert s.build_meta(_step([("r", 4 * BLOCK)], {"r": BLOCK}), lambda _: (blocks,)).saves == []
    # from the step after on, chunks complete as usual (chunk 5 onwards, never 2-4)
    saves = s.build_meta(_step([("r", 5 * BLOCK)], {"r": 2 * BLOCK}), lambda _: (blocks,)).saves
    assert [p.key for p in saves] == r.block_hashes[5:7]


@pytest.mark.parametrize("digest", ["xxh3", "keyed"])
def test_layerwise_over_an_authenticated_data_plane(digest):
    from p2pkv.secret import ClusterSecret

    secret = ClusterSecret(b"s" * 32)

    def transport():
        return make_transport("tcp", bind_host="127.0.0.1", store_bytes=1 << 20,
                              secret=secret, chunk_digest=digest)

    d = RecordingDirectory()
    holder, h_caches = worker(d, transport())
    puller, p_caches = worker(RecordingDirectory(), transport(), groups=2)
    key = ChunkKey(b"a" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
    assert holder.wait_saved(5.0)
    plan = layerwise_plan("r", whole(d.registered[0]), (ChunkLoad(key, (0, 7)),))
    assert run_step(puller, P2PKVMetadata(loads=[plan])) == set()
    for name in h_caches:
        assert torch.equal(p_caches[name][0], h_caches[name][5])
        assert torch.equal(p_caches[name][7], h_caches[name][2])
    holder.shutdown()
    puller.shutdown()
