"""SchedulerSide with a scripted directory and plain request objects (no vLLM, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.directory.client import PENDING  # noqa: E402
from p2pkv.directory.protocol import Holder, LookupReply  # noqa: E402
from p2pkv.keys import Namespace, partial_chunk_key  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.scheduler import SchedulerSide  # noqa: E402

BLOCK = 4


@dataclass
class FakeDirectory:
    replies: list = field(default_factory=list)  # what successive polls return
    asked: list = field(default_factory=list)

    timeouts: list = field(default_factory=list)

    def start_lookup(self, namespace, keys, timeout_s):
        self.asked.append(list(keys))
        self.timeouts.append(timeout_s)
        return len(self.asked)

    def wait_lookup(self, rid, max_wait_s):
        return self.poll_lookup(rid)

    def poll_lookup(self, rid):
        return self.replies.pop(0) if self.replies else PENDING


def request(req_id: str, blocks: int, extra_tokens: int = 0):
    return SimpleNamespace(request_id=req_id,
                           block_hashes=[bytes([i]) * 32 for i in range(blocks)],
                           prompt_token_ids=list(range(blocks * BLOCK + extra_tokens)))


def side(directory, chunk_blocks=1, clock=lambda: 0.0, load_partial=False,
         **kw) -> SchedulerSide:
    """A ``kv_both`` scheduler side (``load_partial``: as a ``kv_consumer`` looks up)."""
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", **kw)
    return SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK,
                         chunk_blocks=chunk_blocks, can_load=True, can_save=True,
                         directory=directory, clock=clock, load_partial=load_partial)


def reply(run: int, address="127.0.0.1:9") -> LookupReply:
    return LookupReply(holders=[Holder(instance="a", address=address, run=run)])


def test_remote_hit_beyond_local_prefix_plans_a_pull_into_the_new_blocks():
    d = FakeDirectory([reply(3)])
    s = side(d)
    r = request("r", 6)
    assert s.get_num_new_matched_tokens(r, 2 * BLOCK) == (3 * BLOCK, True)
    assert d.asked == [r.block_hashes[2:]]  # only chunks beyond the local hit
    s.update_state_after_alloc(r, ([10, 11, 12, 13, 14, 15],), 3 * BLOCK)
    meta = s.build_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                        scheduled_cached_reqs=SimpleNamespace(
                                            req_ids=[], num_computed_tokens=[])),
                        lambda _: ([],))
    (plan,) = meta.loads
    assert [s.address for s in plan.sources[0]] == ["127.0.0.1:9"]
    assert [c.block_ids for c in plan.chunks] == [(12,), (13,), (14,)]
    assert [c.key for c in plan.chunks] == r.block_hashes[2:5]


def test_pending_lookup_asks_again_then_times_out_and_backs_off():
    now = [0.0]
    d = FakeDirectory([PENDING, None, None, None])
    s = side(d, clock=lambda: now[0], directory_backoff_s=5.0)
    r = request("r", 4)
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # None = failed or timed out
    assert s.counters.lookup_timeouts == 1
    # one slow reply is not a dead directory: keep asking until 3 fail in a row
    assert s.get_num_new_matched_tokens(request("r1", 4), 0) == (0, False)
    assert s.get_num_new_matched_tokens(request("r2", 4), 0) == (0, False)
    assert len(d.asked) == 3
    assert s.get_num_new_matched_tokens(request("r3", 4), 0) == (0, False)
    assert len(d.asked) == 3  # backing off: the dead directory is not asked again
    now[0] = 6.0
    d.replies = [LookupReply(holders=[])]
    assert s.get_num_new_matched_tokens(request("r4", 4), 0) == (0, False)
    assert len(d.asked) == 4


def test_a_success_resets_the_failure_count():
    d = FakeDirectory([None, None, LookupReply(holders=[]), None, None])
    s = side(d)
    for i in range(5):
        s.get_num_new_matched_tokens(request(f"r{i}", 4), 0)
    s.get_num_new_matched_tokens(request("r5", 4), 0)
    assert len(d.asked) == 6  # never three failures in a row: never backed off


def test_a_request_is_pulled_at_most_once():
    d = FakeDirectory([reply(2), reply(2)])
    s = side(d)
    r = request("r", 3)
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BLOCK, True)
    s.update_state_after_alloc(r, ([1, 2, 3],), 2 * BLOCK)
    # vLLM asks again after a failed load: no second pull from the same peer.
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)


def test_partial_local_chunk_is_received_into_scratch():
    d = FakeDirectory([reply(1)])
    s = side(d, chunk_blocks=2, chunk_tokens=2 * BLOCK)
    r = request("r", 4)
    # local hit of one block: chunk 0 (blocks 0-1) is half local
    assert s.get_num_new_matched_tokens(r, BLOCK) == (BLOCK, True)
    s.update_state_after_alloc(r, ([7, 8, 9, 10],), BLOCK)
    (plan,) = s.build_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                           scheduled_cached_reqs=SimpleNamespace(
                                               req_ids=[], num_computed_tokens=[])),
                           lambda _: ([],)).loads
    assert plan.chunks[0].block_ids == (None, 8)


def test_saves_each_chunk_once_as_it_completes():
    s = side(FakeDirectory([LookupReply(holders=[])]))
    r = request("r", 5)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    blocks = [20, 21, 22, 23, 24]

    def step(new, cached, scheduled):
        out = SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id="r", num_computed_tokens=c,
                                                block_ids=(blocks,)) for c in new],
            scheduled_cached_reqs=SimpleNamespace(req_ids=["r"] * len(cached),
                                                  num_computed_tokens=cached),
            num_scheduled_tokens={"r": scheduled})
        return [(p.key, p.block_ids) for p in s.build_meta(out, lambda _: (blocks,)).saves]

    assert step([0], [], 2 * BLOCK + 1) == [(r.block_hashes[0], (20,)),
                                            (r.block_hashes[1], (21,))]
    assert step([], [2 * BLOCK + 1], BLOCK) == [(r.block_hashes[2], (22,))]
    assert step([], [3 * BLOCK + 1], 1) == []
    s.request_finished("r")
    assert step([], [4 * BLOCK], BLOCK) == []  # unknown request: nothing to save


def test_producer_never_looks_up_and_consumer_never_saves():
    d = FakeDirectory([reply(2)])
    config = ConnectorConfig(directory="tcp://127.0.0.1:1")
    producer = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK,
                             chunk_blocks=1, can_load=False, can_save=True, directory=d)
    assert producer.get_num_new_matched_tokens(request("r", 3), 0) == (0, False)
    assert d.asked == []


def _step(s, req_id, computed, scheduled, blocks, new=True):
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=req_id, num_computed_tokens=computed,
                                            block_ids=(blocks,))]
        if new else [],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[] if new else [req_id],
                                              num_computed_tokens=[] if new else [computed]),
        num_scheduled_tokens={req_id: scheduled})
    return s.build_meta(out, lambda _: (blocks,)).saves


def test_prefill_saves_the_partial_chunk_once_the_prompt_is_computed():
    config = ConnectorConfig(directory="tcp://127.0.0.1:1")
    s = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=2,
                      can_load=False, can_save=True, directory=FakeDirectory(),
                      save_partial=True)
    r = request("r", 2, extra_tokens=BLOCK + 1)  # one full chunk, then 1 block + 1 token
    s.get_num_new_matched_tokens(r, 0)
    blocks = [30, 31, 32, 33]
    first = _step(s, "r", 0, 2 * BLOCK, blocks)  # the full chunk, prompt not done yet
    assert [p.key for p in first] == [r.block_hashes[1]]
    saves = _step(s, "r", 2 * BLOCK, BLOCK + 1, blocks, new=False)
    (partial,) = saves
    assert partial.key == partial_chunk_key(r.block_hashes, r.prompt_token_ids, BLOCK, 2)
    assert partial.block_ids == (32, 33)  # the tail's two blocks, already a whole chunk
    assert _step(s, "r", 3 * BLOCK + 1, 1, blocks, new=False) == []  # once


def test_partial_chunk_is_padded_with_its_last_block():
    config = ConnectorConfig(directory="tcp://127.0.0.1:1")
    s = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=2,
                      can_load=False, can_save=True, directory=FakeDirectory(),
                      save_partial=True)
    r = request("r", 2, extra_tokens=3)
    s.get_num_new_matched_tokens(r, 0)
    saves = _step(s, "r", 0, 2 * BLOCK + 3, [5, 6, 7])
    assert [p.block_ids for p in saves] == [(5, 6), (7, 7)]


def test_kv_both_never_saves_a_partial_chunk():
    s = side(FakeDirectory([LookupReply(holders=[])]))
    r = request("r", 1, extra_tokens=2)
    s.get_num_new_matched_tokens(r, 0)
    assert [p.key for p in _step(s, "r", 0, BLOCK + 2, [1, 2])] == [r.block_hashes[0]]


def test_decode_pulls_the_partial_chunk_and_the_whole_prompt():
    d = FakeDirectory([reply(3)])
    s = side(d, chunk_blocks=2, chunk_tokens=2 * BLOCK, load_partial=True)  # kv_consumer
    r = request("r", 4, extra_tokens=3)  # two full chunks + 3 tokens
    assert s.get_num_new_matched_tokens(r, 0) == (4 * BLOCK + 3, True)
    partial = partial_chunk_key(r.block_hashes, r.prompt_token_ids, BLOCK, 2)
    assert d.asked == [[r.block_hashes[1], r.block_hashes[3], partial]]
    s.update_state_after_alloc(r, ([10, 11, 12, 13, 14],), 4 * BLOCK + 3)
    (plan,) = s.build_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                           scheduled_cached_reqs=SimpleNamespace(
                                               req_ids=[], num_computed_tokens=[])),
                           lambda _: ([],)).loads
    assert [c.block_ids for c in plan.chunks] == [(10, 11), (12, 13), (14, None)]


def test_a_decode_instance_waits_longer_for_the_directory_than_a_kv_both_one():
    both, consumer = FakeDirectory([reply(1)]), FakeDirectory([reply(1)])
    side(both, lookup_timeout_s=0.25).get_num_new_matched_tokens(request("r", 2), 0)
    side(consumer, load_partial=True, lookup_timeout_s=0.25,
         consumer_lookup_timeout_s=1.5).get_num_new_matched_tokens(request("r", 2), 0)
    assert both.timeouts == [0.25] and consumer.timeouts == [1.5]


def test_a_run_without_the_partial_chunk_stops_at_the_last_full_chunk():
    d = FakeDirectory([reply(2)])
    s = side(d)
    r = request("r", 2, extra_tokens=3)
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BLOCK, True)


@dataclass
class CountingDirectory:
    """Counts every call of the interface the scheduler side uses; answers "no holders"."""

    calls: list = field(default_factory=list)

    def start_lookup(self, namespace, keys, timeout_s):
        self.calls.append(("start_lookup", list(keys)))
        return len(self.calls)

    def wait_lookup(self, rid, max_wait_s):
        self.calls.append(("wait_lookup", rid))
        return PENDING

    def poll_lookup(self, rid):
        self.calls.append(("poll_lookup", rid))
        return LookupReply(holders=[])


def _local_hit(blocks: int, extra_tokens: int) -> int:
    """vLLM's local hit on a fully cached prompt: its full blocks, short of its last token."""
    return (blocks * BLOCK + extra_tokens - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("chunk_blocks", [1, 2, 4])
@pytest.mark.parametrize("extra_tokens", [0, 1, 3])
@pytest.mark.parametrize("load_partial", [False, True])
def test_a_fully_local_prefix_never_contacts_the_directory_nor_waits_a_step(
        chunk_blocks, extra_tokens, load_partial):
    """Issue 17: a local hit covering every full block (the tail past the last full chunk
    is at most a partial chunk) is answered at once: (0, False), never None (an engine step),
    and the directory is not asked anything (kv_both, and a kv_consumer for its partial)."""
    d = CountingDirectory()
    s = side(d, chunk_blocks=chunk_blocks, chunk_tokens=chunk_blocks * BLOCK,
             load_partial=load_partial)
    r = request("r", 8, extra_tokens=extra_tokens)
    assert s.get_num_new_matched_tokens(r, _local_hit(8, extra_tokens)) == (0, False)
    assert d.calls == []
    assert s.counters.lookups == 0


def test_a_local_hit_short_of_a_chunk_still_asks_once_and_cold_misses_ask():
    """The counterpart: where a peer could add more than a block, the directory is asked."""
    d = CountingDirectory()
    s = side(d, chunk_blocks=2, chunk_tokens=2 * BLOCK)
    assert s.get_num_new_matched_tokens(request("cold", 8), 0) == (None, False)
    assert [c[0] for c in d.calls] == ["start_lookup", "wait_lookup"]
    assert s.get_num_new_matched_tokens(request("cold", 8), 0) == (0, False)
    d.calls.clear()
    r = request("part", 8, extra_tokens=1)
    assert s.get_num_new_matched_tokens(r, 4 * BLOCK)[0] is None  # chunks 2-3 beyond the hit
    assert d.calls[0] == ("start_lookup", [r.block_hashes[5], r.block_hashes[7]])


def test_the_chunks_of_a_local_hit_are_not_saved_again():
    s = side(CountingDirectory(), chunk_blocks=2, chunk_tokens=2 * BLOCK)
    r = request("r", 8, extra_tokens=1)
    s.get_num_new_matched_tokens(r, _local_hit(8, 1))  # all 4 chunks local
    blocks = list(range(20, 29))
    assert _step(s, "r", _local_hit(8, 1), 1, blocks) == []
    r2 = request("r2", 8)
    s.get_num_new_matched_tokens(r2, 2 * BLOCK)  # chunk 0 local, chunks 1-3 computed
    assert [p.key for p in _step(s, "r2", 2 * BLOCK, 6 * BLOCK, blocks)] == [
        r2.block_hashes[3], r2.block_hashes[5], r2.block_hashes[7]]


def test_the_step_names_the_blocks_it_may_write_for_the_save_fence():
    from p2pkv.vllm.scheduler import new_blocks

    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="a", num_computed_tokens=0,
                                            block_ids=([1, 2],))],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["b", "c"], num_computed_tokens=[4, 4],
                                              new_block_ids=[([7],), None]),
        new_block_ids_to_zero=[9], kv_cache_block_copies=[SimpleNamespace(dst_block_id=11)],
        num_scheduled_tokens={})
    assert new_blocks(out) == {1, 2, 7, 9, 11}
    s = side(CountingDirectory())
    assert s.build_meta(out, lambda _: ([],)).new_blocks == {1, 2, 7, 9, 11}


def _pulled(s, blocks=(10, 11, 12, 13, 14, 15)):
    """Request ``r`` of 6 blocks: blocks 0-1 local, chunks 2-4 pulled into ``blocks``."""
    r = request("r", 6)
    assert s.get_num_new_matched_tokens(r, 2 * BLOCK) == (3 * BLOCK, True)
    s.update_state_after_alloc(r, (list(blocks),), 3 * BLOCK)
    # the load's step: the request waits for its KV (vLLM schedules it not), nothing is saved
    empty = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                            scheduled_cached_reqs=SimpleNamespace(req_ids=[],
                                                                  num_computed_tokens=[]))
    meta = s.build_meta(empty, lambda _: (list(blocks),))
    assert len(meta.loads) == 1 and meta.saves == []
    return r


def test_pulled_chunks_that_landed_are_saved_once_after_the_load():
    d = FakeDirectory([reply(3)])
    s = side(d)
    r = _pulled(s)
    blocks = [10, 11, 12, 13, 14, 15]
    # vLLM schedules it once every chunk landed: num_computed_tokens covers the pull
    saves = _step(s, "r", 5 * BLOCK, BLOCK, blocks)
    assert [(p.key, p.block_ids) for p in saves] == [
        (r.block_hashes[2], (12,)), (r.block_hashes[3], (13,)), (r.block_hashes[4], (14,)),
        (r.block_hashes[5], (15,))]  # the pulled chunks, then the one computed
    assert _step(s, "r", 6 * BLOCK, 1, blocks, new=False) == []  # once per chunk


def test_a_failed_pull_is_not_saved_its_recompute_is():
    s = side(FakeDirectory([reply(3)]))
    r = _pulled(s)
    blocks = [10, 11, 12, 13, 14, 15]
    # chunk 3 failed: vLLM cut num_computed_tokens back to its first block
    assert [p.key for p in _step(s, "r", 3 * BLOCK, 1, blocks)] == [r.block_hashes[2]]
    assert _step(s, "r", 3 * BLOCK + 1, BLOCK - 2, blocks, new=False) == []  # not whole yet
    assert [p.key for p in _step(s, "r", 4 * BLOCK - 1, 2 * BLOCK + 1, blocks,
                                 new=False)] == r.block_hashes[3:6]  # recomputed


def test_a_whole_request_failure_saves_nothing_pulled():
    s = side(FakeDirectory([reply(3)]))
    r = _pulled(s)
    blocks = [20, 21, 22, 23, 24, 25]
    # per-request failure: vLLM sets num_computed_tokens to 0 and asks again (local hit)
    assert s.get_num_new_matched_tokens(r, 2 * BLOCK) == (0, False)
    assert _step(s, "r", 2 * BLOCK, 1, blocks) == []


def test_without_save_pulled_only_computed_chunks_are_saved():
    s = side(FakeDirectory([reply(3)]), save_pulled=False)
    r = _pulled(s)
    blocks = [10, 11, 12, 13, 14, 15]
    assert [p.key for p in _step(s, "r", 5 * BLOCK, BLOCK, blocks)] == [r.block_hashes[5]]


def test_save_pulled_is_off_where_the_instance_does_not_save_or_has_a_window():
    config = ConnectorConfig(directory="tcp://127.0.0.1:1")
    for can_save, window in ((False, False), (True, True)):
        s = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK,
                          chunk_blocks=1, can_load=True, can_save=can_save,
                          directory=FakeDirectory([reply(3)]), load_partial=not can_save,
                          hit_below_prompt=window)
        r = request("r", 6, extra_tokens=1)
        assert s.get_num_new_matched_tokens(r, 2 * BLOCK)[0] == 3 * BLOCK
        s.update_state_after_alloc(r, ([10, 11, 12, 13, 14, 15, 16],), 3 * BLOCK)
        keys = [p.key for p in _step(s, "r", 5 * BLOCK, BLOCK, [10, 11, 12, 13, 14, 15, 16])]
        assert keys == ([] if not can_save else [r.block_hashes[5]])


def _planner_step(new=(), cached=()):
    """A SchedulerOutput: ``new`` (req_id, prompt, computed, scheduled), ``cached``
    (req_id, computed, scheduled)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, prompt_token_ids=list(range(p)),
                                            num_computed_tokens=c, block_ids=([],))
                            for r, p, c, _ in new],
        num_scheduled_tokens={**{r: n for r, _, _, n in new}, **{r: n for r, _, n in cached}},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _, _ in cached],
                                              num_computed_tokens=[c for _, c, _ in cached]))


def test_planner_skips_a_pull_from_a_peer_measured_slower_than_recomputing():
    from p2pkv.vllm.metadata import P2PKVWorkerMeta
    from p2pkv.vllm.planning import ConnectorPlanner, PullSample, optimistic_profile

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    kv = 1_000_000  # bytes per token
    planner = ConnectorPlanner(optimistic_profile(kv), clock=clock)
    d = FakeDirectory([reply(64), reply(64)])
    config = ConnectorConfig(directory="tcp://127.0.0.1:1")
    s = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=1,
                      can_load=True, can_save=False, directory=d, clock=clock,
                      planner=planner)
    # a fresh instance pulls
    r1 = request("r1", 64)
    assert s.get_num_new_matched_tokens(r1, 0) == (64 * BLOCK - 0, True)
    s.update_state_after_alloc(r1, (list(range(64)),), 64 * BLOCK)
    meta = s.build_meta(_planner_step(), lambda _: ([],))
    assert meta.loads[0].peer == "a"
    # the pulls were slow (10 MB/s) and this instance prefills 256 tokens in 10 ms
    s.update_connector_output(P2PKVWorkerMeta(
        [PullSample("a", n * kv, n * kv / 10e6) for n in (64, 256, 128)]))
    s.build_meta(_planner_step(new=[("p", 256, 0, 256)]), lambda _: ([],))
    now[0] += 0.010
    s.update_connector_output(P2PKVWorkerMeta())
    r2 = request("r2", 64)
    assert s.get_num_new_matched_tokens(r2, 0) == (0, False)
    assert s.counters.pulls_skipped == 1 and s.counters.loads_planned == 1
    now[0] += 2.0
    meta = s.build_meta(_planner_step(), lambda _: ([],))
    assert meta.planner_status["planner_skipped"] == 1
    assert meta.planner_status["planner_peer_MBps_a"] == 10
    assert s.take_stats().gauges["planner_peer_bytes_per_second|a"] == pytest.approx(10e6)


def test_worker_meta_of_several_ranks_aggregates_their_pulls():
    from p2pkv.vllm.metadata import P2PKVWorkerMeta
    from p2pkv.vllm.planning import PullSample

    a, b = PullSample("x", 1, 0.1), PullSample("x", 2, 0.2)
    assert P2PKVWorkerMeta([a]).aggregate(P2PKVWorkerMeta([b])).pulls == [a, b]
