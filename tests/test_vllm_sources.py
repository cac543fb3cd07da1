"""Slices and the scheduler side's per-rank source planning (pure: constructed holder lists)."""

from __future__ import annotations

import msgspec
import pytest

from p2pkv.directory.protocol import Holder
from p2pkv.keys import InstanceId
from p2pkv.slices import KVSlice, is_lowest_replica, rank_slice, tp_heads, tp_slices
from p2pkv.transport.selection import Selection
from p2pkv.vllm.sources import plan_sources

L = 2  # layers of the model in these tests


def ranks(engine: str, tp: int, heads: int = 4, runs=None, mla: bool = False) -> list[Holder]:
    """The registered ranks of one engine (replicas do not register), as a lookup returns."""
    slices = tp_slices(num_kv_heads=heads, num_layers=L, tp_size=tp, mla=mla)
    out = []
    for r, sl in enumerate(slices):
        if is_lowest_replica(slices, r):
            run = runs[r] if runs else 3
            out.append(Holder(InstanceId(f"{engine}/{r}"), f"h{engine}:{1000 + r}", run,
                              engine, sl))
    return out


def wanted(tp: int, heads: int = 4, mla: bool = False) -> tuple[KVSlice, ...]:
    return tp_slices(num_kv_heads=heads, num_layers=L, tp_size=tp, mla=mla)


def heads_of(sources) -> list[tuple[str, int, int]]:
    return [(s.address, s.part.head_start, s.part.head_end) for s in sources]


def test_vllms_head_split_and_replication_rule():
    assert [tp_heads(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [tp_heads(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [tp_heads(1, 2, r) for r in range(2)] == [(0, 1), (0, 1)]
    with pytest.raises(ValueError):
        tp_heads(3, 2, 0)  # vLLM refuses this split too
    mla = tp_slices(num_kv_heads=1, num_layers=L, tp_size=4, mla=True)
    assert len(set(mla)) == 1 and [is_lowest_replica(mla, r) for r in range(4)] == [
        True, False, False, False]
    assert rank_slice(num_kv_heads=4, num_layers=L, tp_size=1, tp_rank=0) == KVSlice.whole(4, L)


def test_slices_validate_and_travel_in_the_protocol():
    with pytest.raises(ValueError):
        KVSlice(2, 2, 4, 0, 1, 1)
    with pytest.raises(msgspec.ValidationError):
        bad = {"head_start": 0, "head_end": 9, "num_heads": 4, "layer_start": 0,
               "layer_end": 1, "num_layers": 1}
        msgspec.msgpack.decode(msgspec.msgpack.encode(bad), type=KVSlice)
    holder = Holder(InstanceId("e/1"), "h:1", 2, "e", KVSlice(2, 4, 4, 0, L, L))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(holder), type=Holder) == holder


def test_same_tp_each_rank_pulls_its_own_rank():
    plan = plan_sources(ranks("a", 2), wanted(2))
    assert plan is not None and plan.run == 3
    assert [heads_of(s) for s in plan.per_rank] == [[("ha:1000", 0, 2)], [("ha:1001", 2, 4)]]
    assert all(s.part == s.holder for rs in plan.per_rank for s in rs)


def test_tp2_to_tp1_pulls_both_holder_ranks_whole():
    plan = plan_sources(ranks("a", 2), wanted(1))
    assert plan is not None
    assert [heads_of(s) for s in plan.per_rank] == [[("ha:1000", 0, 2), ("ha:1001", 2, 4)]]


def test_tp1_to_tp2_each_rank_pulls_its_half_of_the_one_holder():
    plan = plan_sources(ranks("a", 1), wanted(2))
    assert plan is not None
    assert [heads_of(s) for s in plan.per_rank] == [[("ha:1000", 0, 2)], [("ha:1000", 2, 4)]]
    assert all(s.holder == KVSlice.whole(4, L) for rs in plan.per_rank for s in rs)


def test_tp2_to_tp4_with_two_kv_heads_replicas_pull_the_same_head():
    plan = plan_sources(ranks("a", 2, heads=2), wanted(4, heads=2))
    assert plan is not None
    assert [heads_of(s) for s in plan.per_rank] == [
        [("ha:1000", 0, 1)], [("ha:1000", 0, 1)], [("ha:1001", 1, 2)], [("ha:1001", 1, 2)]]
    # and back: TP 4 (two registered ranks) to TP 1
    plan = plan_sources(ranks("b", 4, heads=2), wanted(1, heads=2))
    assert plan is not None
    assert [heads_of(s) for s in plan.per_rank] == [[("hb:1000", 0, 1), ("hb:1002", 1, 2)]]


def test_mla_every_rank_pulls_the_one_registered_slice():
    plan = plan_sources(ranks("a", 2, heads=1, mla=True), wanted(4, heads=1, mla=True))
    assert plan is not None
    assert {s.address for rs in plan.per_rank for s in rs} == {"ha:1000"}


def test_the_run_is_the_shortest_needed_slice_and_a_missing_slice_is_no_plan():
    plan = plan_sources(ranks("a", 2, runs=[5, 2]), wanted(1))
    assert plan is not None and plan.run == 2
    # rank 1 of engine a holds nothing: a cannot serve TP 1 or TP 2 pullers ...
    only_rank0 = ranks("a", 2)[:1]
    assert plan_sources(only_rank0, wanted(1)) is None
    assert plan_sources(only_rank0, wanted(2)) is None
    # ... but rank 0 alone serves a TP 4 puller's ranks 0 and 1? No: a plan covers every
    # rank, and ranks 2, 3 need heads 2-3.
    assert plan_sources(only_rank0, wanted(4)) is None


def test_best_engine_has_the_longest_run_then_fewest_sources_and_never_mixes_engines():
    holders = ranks("a", 2, runs=[4, 1]) + ranks("b", 1, runs=[3])
    plan = plan_sources(holders, wanted(1))
    assert plan is not None and plan.engine == "b" and plan.run == 3
    holders = ranks("a", 2, runs=[3, 3]) + ranks("b", 1, runs=[3])
    plan = plan_sources(holders, wanted(1))
    assert plan is not None and plan.engine == "b"  # one source instead of two
    # a's rank 0 and b's rank 1 together would cover TP 1, but never from two engines
    assert plan_sources(ranks("a", 2)[:1] + ranks("b", 2)[1:], wanted(1)) is None


def test_a_holder_without_a_slice_holds_the_whole_model():
    old = Holder(InstanceId("x"), "hx:1", 2)
    plan = plan_sources([old], wanted(2))
    assert plan is not None and plan.engine == "x"
    assert [heads_of(s) for s in plan.per_rank] == [[("hx:1", 0, 2)], [("hx:1", 2, 4)]]


def test_exact_only_uses_equal_slices_only():
    assert plan_sources(ranks("a", 2), wanted(2), exact_only=True) is not None
    assert plan_sources(ranks("a", 2), wanted(1), exact_only=True) is None
    assert plan_sources(ranks("a", 1), wanted(2), exact_only=True) is None


def test_part_selection_names_the_heads_and_layers_of_the_holders_chunk():
    from p2pkv.vllm.layout import part_selection

    holder = KVSlice.whole(4, 2)
    part = KVSlice(2, 4, 4, 0, 2, 2)
    sel = part_selection(holder, part, head_bytes=10)
    assert sel == Selection(rows=2, row_bytes=40, first_row=0, num_rows=2, offset=20, length=20)
    assert sel.check(160) == "" and sel.nbytes(160) == 80  # 2 blocks x 2 layers x 2 heads
    assert list(sel.ranges(160)) == [(20, 20), (60, 20), (100, 20), (140, 20)]
    assert part_selection(holder, holder, 10) is None
    assert Selection(2, 40, 1, 1, 0, 40).check(160) == ""
    assert list(Selection(2, 40, 1, 1, 0, 40).ranges(160)) == [(40, 40), (120, 40)]
    assert "outside" in Selection(2, 40, 0, 2, 30, 20).check(160)
    assert "groups" in Selection(2, 40, 0, 2, 0, 20).check(100)


def test_a_sharded_lookup_keeps_each_holder_ranks_engine_and_slice():
    from p2pkv.directory.ring import ShardAnswer, ShardId, merge_runs

    a0, a1 = ranks("a", 2)
    answers = {ShardId("s0"): ShardAnswer([0, 2], [a0, a1]),  # keys 0 and 2 live on s0
               ShardId("s1"): ShardAnswer([1], [msgspec.structs.replace(a0, run=1)])}
    merged = merge_runs(3, answers)
    by_instance = {h.instance: h for h in merged}
    assert by_instance[a0.instance].run == 3 and by_instance[a1.instance].run == 1
    assert by_instance[a0.instance].slice == a0.slice and by_instance[a1.instance].engine == "a"


def test_sources_carry_the_holders_key_and_epoch():
    """Each source names the key its holder registered with (issue 13: the puller's data
    plane checks the holder proves it); a holder without one, or with a malformed one, is
    not checked (None), as from a directory without a secret."""
    import zmq

    from p2pkv.transport.identity import holder_key

    public, _ = zmq.curve_keypair()
    whole = KVSlice(0, 4, 4, 0, L, L)
    holders = [Holder(InstanceId("a"), "ha:1", 3, "a", whole, epoch=7, key=public.decode()),
               Holder(InstanceId("b"), "hb:1", 3, "b", whole, epoch=8),
               Holder(InstanceId("c"), "hc:1", 3, "c", whole, key="not-a-key")]
    for h, key in zip(holders, [holder_key(public), None, None]):
        plan = plan_sources([h], [whole])
        assert plan is not None
        (src,) = plan.per_rank[0]
        assert (src.epoch, src.key) == (h.epoch, key)
