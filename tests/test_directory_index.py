"""DirectoryIndex: registrations, leases, epochs, seqs, probes and leading-run lookups
(pure, no I/O; time is passed in)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv.directory.index import DirectoryIndex, DirectoryIndexError
from p2pkv.directory.protocol import Status
from p2pkv.keys import ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(60)

NS, OTHER = Namespace("ns"), Namespace("other")
A, B, C = InstanceId("a"), InstanceId("b"), InstanceId("c")
K = [ChunkKey(bytes([i]) * 32) for i in range(8)]
LEASE = 3.0


class Seq:
    """Next publish seq per instance, as a well-behaved client would send."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def __call__(self, instance: str) -> int:
        self.n[instance] = self.n.get(instance, 0) + 1
        return self.n[instance]


def reg(index: DirectoryIndex, inst: InstanceId, epoch: int = 1, ns: Namespace = NS,
        address: str | None = None, probe: str = "p", now: float = 0.0):
    return index.register(inst, epoch, ns, address or f"{inst}:{epoch}", probe, (), now)


def pub(index: DirectoryIndex, seq: Seq, inst: InstanceId, added=(), removed=(),
        ns: Namespace = NS, now: float = 0.0) -> None:
    index.publish(inst, ns, seq(inst), False, added, removed, now)


def runs(index: DirectoryIndex, keys: list[ChunkKey], ns: Namespace = NS) -> list[tuple]:
    return [(h.instance, h.address, h.run) for h in index.lookup(ns, keys, 0.0)]


def chunks(index: DirectoryIndex, inst: InstanceId) -> int:
    m = index.member(inst)
    assert m is None or m.chunks == len(index.keys_of(inst))
    return m.chunks if m else 0


@pytest.fixture
def index() -> DirectoryIndex:
    index = DirectoryIndex(LEASE)
    reg(index, A)
    reg(index, B)
    return index


@pytest.fixture
def seq() -> Seq:
    return Seq()


def test_lookup_runs_are_leading_and_sorted(index, seq) -> None:
    pub(index, seq, A, K[:2])
    pub(index, seq, B, K[:4])
    assert runs(index, K[:5]) == [("b", "b:1", 4), ("a", "a:1", 2)]


def test_a_gap_ends_the_run(index, seq) -> None:
    pub(index, seq, A, [K[0], K[1], K[3]])
    assert runs(index, K[:4]) == [("a", "a:1", 2)]
    assert runs(index, K[1:4]) == [("a", "a:1", 1)]
    assert runs(index, []) == [] and runs(index, K[:3], ns=OTHER) == []


def test_ties_sort_by_instance_and_namespaces_are_separate(index, seq) -> None:
    pub(index, seq, B, K[:3])
    pub(index, seq, A, K[:3])
    reg(index, C, ns=OTHER)
    pub(index, seq, C, K[:1], ns=OTHER)
    assert runs(index, K[:3]) == [("a", "a:1", 3), ("b", "b:1", 3)]
    assert runs(index, K[:3], ns=OTHER) == [("c", "c:1", 1)]


def test_remove_duplicates_and_add_then_remove(index, seq) -> None:
    pub(index, seq, A, K[:3] + K[:3])
    assert chunks(index, A) == 3
    pub(index, seq, A, [], [K[1], K[7]])
    assert runs(index, K[:3]) == [("a", "a:1", 1)]
    pub(index, seq, A, [K[5]], [K[5]])
    assert chunks(index, A) == 2


def test_new_epoch_drops_old_entries_at_once(index, seq) -> None:
    pub(index, seq, A, K[:3])
    pub(index, seq, B, K[:1])
    out = reg(index, A, epoch=2)
    assert out.joined and out.replaced is not None and out.replaced.epoch == 1
    assert chunks(index, A) == 0
    assert runs(index, K[:3]) == [("b", "b:1", 1)]
    index.publish(A, NS, 1, False, K[:2], [], 0.0)
    assert runs(index, K[:3]) == [("a", "a:2", 2), ("b", "b:1", 1)]


def test_lower_epoch_is_refused_as_stale(index, seq) -> None:
    reg(index, A, epoch=5)
    with pytest.raises(DirectoryIndexError) as info:
        reg(index, A, epoch=4)
    assert info.value.status == Status.STALE_EPOCH
    with pytest.raises(DirectoryIndexError) as info:
        index.heartbeat(A, 4, 0, 0.0)
    assert info.value.status == Status.STALE_EPOCH
    assert index.member(A).epoch == 5


def test_same_registration_refreshes_keeps_entries_and_updates_address(index, seq) -> None:
    pub(index, seq, A, K[:2])
    out = reg(index, A, address="a:9")
    assert not out.joined and out.replaced is None
    assert runs(index, K[:2]) == [("a", "a:9", 2)]


def test_new_namespace_drops_old_entries(index, seq) -> None:
    pub(index, seq, A, K[:2])
    reg(index, A, ns=OTHER)
    assert runs(index, K[:2]) == [] and chunks(index, A) == 0


def test_probe_mismatch_is_refused_and_names_both(index) -> None:
    with pytest.raises(DirectoryIndexError) as info:
        reg(index, C, probe="zz")
    assert info.value.status == Status.PROBE_MISMATCH
    assert "zz" in str(info.value) and "PYTHONHASHSEED" in str(info.value)
    assert "instance a" in str(info.value) or "instance b" in str(info.value)
    reg(index, C, probe="zz", ns=OTHER)  # alone in its namespace: fine


def test_errors_for_unknown_instance_wrong_namespace_and_seq_gap(index, seq) -> None:
    for call in (lambda: pub(index, seq, C, K[:1]),
                 lambda: index.set_counters(C, {"x": 1}, 0.0),
                 lambda: index.heartbeat(C, 1, 0, 0.0),
                 lambda: index.heartbeat(A, 2, 0, 0.0)):
        with pytest.raises(DirectoryIndexError) as info:
            call()
        assert info.value.status == Status.UNKNOWN_INSTANCE
    with pytest.raises(DirectoryIndexError) as info:
        pub(index, seq, A, K[:1], ns=OTHER)
    assert info.value.status == Status.WRONG_NAMESPACE
    with pytest.raises(DirectoryIndexError) as info:
        index.publish(A, NS, 5, False, K[:1], [], 0.0)
    assert info.value.status == Status.SEQ_GAP
    assert chunks(index, A) == 0  # nothing applied


def test_heartbeat_reports_a_gap_and_reset_repairs_it(index, seq) -> None:
    index.publish(A, NS, 1, False, K[:1], [], 0.0)
    index.heartbeat(A, 1, 1, 0.0)
    with pytest.raises(DirectoryIndexError) as info:
        index.heartbeat(A, 1, 3, 0.0)  # publish 2 and 3 were lost
    assert info.value.status == Status.SEQ_GAP
    index.publish(A, NS, 4, True, K[2:4], [], 0.0)
    index.heartbeat(A, 1, 4, 0.0)
    assert runs(index, K[2:4]) == [("a", "a:1", 2)] and runs(index, K[:1]) == []


def test_leases_expire_unless_renewed(seq) -> None:
    index = DirectoryIndex(LEASE)
    reg(index, A, now=0.0)
    reg(index, B, now=0.0)
    pub(index, seq, A, K[:2], now=0.0)
    pub(index, seq, B, K[:2], now=0.0)
    index.heartbeat(B, 1, 1, 2.0)
    assert index.expire(2.9) == []
    gone = index.expire(3.0)
    assert [m.instance for m in gone] == [A]
    assert runs(index, K[:2]) == [("b", "b:1", 2)]
    assert [m.instance for m in index.expire(5.0)] == [B]
    assert len(index) == 0 and index.num_chunks == 0


def test_expiry_skips_replaced_and_dropped_registrations() -> None:
    index = DirectoryIndex(LEASE)
    reg(index, A, epoch=1, now=0.0)
    reg(index, A, epoch=2, now=1.0)  # a new process replaces epoch 1
    reg(index, B, now=0.0)
    index.unregister(B, 1, 0.5)
    reg(index, C, now=0.0)
    for t in (1.0, 2.0, 3.0, 3.5):  # C heartbeats on, past its first deadline (3.0)
        index.heartbeat(C, 1, 0, t)
        assert index.expire(t) == []
    assert [(m.instance, m.epoch) for m in index.expire(1.0 + LEASE)] == [(A, 2)]
    assert [m.instance for m in index.expire(3.5 + LEASE)] == [C]
    assert len(index) == 0 and index.expire(100.0) == []


def test_handles_are_reused_and_bitmasks_stay_small(seq) -> None:
    index = DirectoryIndex(LEASE)
    for i in range(8):
        reg(index, InstanceId(f"i{i}"))
        pub(index, seq, InstanceId(f"i{i}"), K)
    index.drop(InstanceId("i3"))
    reg(index, InstanceId("new"))
    assert index.member(InstanceId("new")).handle == 3
    # one holder set, so one interned value for every key: no object per key
    assert len({id(v) for v in index._spaces[NS].table.values()}) == 1
    assert len(runs(index, K)) == 7 and all(r[2] == len(K) for r in runs(index, K))


def test_instances_report_chunks_counters_and_lease(index, seq) -> None:
    pub(index, seq, B, K[:2])
    index.set_counters(B, {"chunks_pulled": 5}, 1.0)
    infos = index.instances(1.0)
    assert [(i.instance, i.epoch, i.chunks) for i in infos] == [("a", 1, 0), ("b", 1, 2)]
    assert infos[1].counters == {"chunks_pulled": 5}
    assert infos[0].lease_left_ms == 2000 and infos[1].lease_left_ms == 3000


def test_no_storage_left_after_everything_is_dropped(index, seq) -> None:
    pub(index, seq, A, K)
    pub(index, seq, B, K)
    index.drop(A)
    pub(index, seq, B, [], K)
    space = index._spaces[NS]  # B is still registered
    assert space.table == {} and space._canon == {} and space._refs == {}
    assert index.num_chunks == 0
    index.drop(B)
    assert index._spaces == {}


# -- property: the bitmask index answers like a naive model ---------------------------------

_inst = st.sampled_from([A, B, C])
_key = st.sampled_from(K)
_op = st.one_of(
    st.tuples(st.just("pub"), _inst, st.lists(_key, max_size=5), st.lists(_key, max_size=3)),
    st.tuples(st.just("reset"), _inst, st.lists(_key, max_size=5), st.just([])),
    st.tuples(st.just("drop"), _inst, st.just([]), st.just([])),
    st.tuples(st.just("reg"), _inst, st.just([]), st.just([])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40), st.lists(_key, min_size=1, max_size=8))
def test_matches_a_naive_model(ops, query) -> None:
    index = DirectoryIndex(LEASE)
    model: dict[str, set[bytes]] = {}
    seqs: dict[str, int] = {}
    epochs: dict[str, int] = {}
    for op, inst, added, removed in ops:
        if op == "reg" or (inst not in model and op in ("pub", "reset")):
            epochs[inst] = epochs.get(inst, 0) + 1
            reg(index, inst, epoch=epochs[inst])
            model[inst], seqs[inst] = set(), 0
        if op in ("pub", "reset"):
            seqs[inst] += 1
            index.publish(inst, NS, seqs[inst], op == "reset", added, removed, 0.0)
            if op == "reset":
                model[inst] = set()
            model[inst] |= set(added)
            model[inst] -= set(removed)
        elif op == "drop":
            index.drop(inst)
            model.pop(inst, None)
    expected = []
    for inst, keys in model.items():
        run = 0
        while run < len(query) and query[run] in keys:
            run += 1
        if run:
            expected.append((inst, run))
    expected.sort(key=lambda x: (-x[1], x[0]))
    assert [(h.instance, h.run) for h in index.lookup(NS, query, 0.0)] == expected
    assert index.num_chunks == len(set().union(*model.values())) if model else True
    for inst, keys in model.items():
        assert index.keys_of(inst) == keys and index.member(inst).chunks == len(keys)


def test_ranks_of_instances_at_different_tp_share_a_namespace(seq) -> None:
    from p2pkv.slices import KVSlice, tp_slices

    index = DirectoryIndex(LEASE)
    tp2 = tp_slices(num_kv_heads=4, num_layers=2, tp_size=2)
    for r, sl in enumerate(tp2):
        index.register(InstanceId(f"e2/{r}"), 1, NS, f"h:{r + 1}", "p", (), 0.0,
                       engine="e2", slice=sl)
        pub(index, seq, InstanceId(f"e2/{r}"), K[:2 - r])
    index.register(InstanceId("e1"), 1, NS, "h:9", "p", (), 0.0, engine="e1",
                   slice=KVSlice.whole(4, 2))
    pub(index, seq, InstanceId("e1"), K[:1])
    holders = index.lookup(NS, K[:2], 0.0)
    assert [(h.instance, h.engine, h.slice, h.run) for h in holders] == [
        ("e2/0", "e2", tp2[0], 2), ("e1", "e1", KVSlice.whole(4, 2), 1),
        ("e2/1", "e2", tp2[1], 1)]
    info = {i.instance: i for i in index.instances(0.0)}
    assert info[InstanceId("e2/1")].slice == tp2[1] and info[InstanceId("e2/1")].engine == "e2"
    # a slice of another model shape in the same namespace is a broken peer: refused
    with pytest.raises(DirectoryIndexError) as e:
        index.register(InstanceId("x"), 1, NS, "h:7", "p", (), 0.0, engine="x",
                       slice=KVSlice.whole(8, 2))
    assert e.value.status == Status.BAD_REQUEST
    # the same registration with another slice is a new one (its keys are dropped)
    index.register(InstanceId("e1"), 1, NS, "h:9", "p", (), 0.0, engine="e1", slice=tp2[0])
    assert chunks(index, InstanceId("e1")) == 0


# -- property: the same with namespaces too big to sweep at once ----------------------------

_op_or_sweep = st.one_of(_op, st.tuples(st.just("sweep"), _inst, st.just([]), st.just([])))


@settings(max_examples=300, deadline=None)
@given(st.lists(_op_or_sweep, max_size=50), st.lists(_key, min_size=1, max_size=8))
def test_incremental_sweeps_answer_like_a_naive_model(ops, query) -> None:
    """Departed members' keys are removed a few keys per ``sweep()`` (as in a namespace of
    more than SWEEP_KEYS_PER_STEP keys): lookups never show them meanwhile, handles are
    reused only once swept, and the tables end up exactly as the model's."""
    from unittest import mock

    import p2pkv.directory.index as index_module

    with mock.patch.object(index_module, "SWEEP_KEYS_PER_STEP", 0):
        index = DirectoryIndex(LEASE)
        model: dict[str, set[bytes]] = {}
        seqs: dict[str, int] = {}
        epochs: dict[str, int] = {}
        for op, inst, added, removed in ops:
            if op == "sweep":
                index.sweep(2)
                continue
            if op == "reg" or (inst not in model and op in ("pub", "reset")):
                epochs[inst] = epochs.get(inst, 0) + 1
                reg(index, inst, epoch=epochs[inst])
                model[inst], seqs[inst] = set(), 0
            if op in ("pub", "reset"):
                seqs[inst] += 1
                index.publish(inst, NS, seqs[inst], op == "reset", added, removed, 0.0)
                if op == "reset":
                    model[inst] = set()
                model[inst] |= set(added)
                model[inst] -= set(removed)
            elif op == "drop":
                index.drop(inst)
                model.pop(inst, None)
            handles = [m.handle for m in index.members()]
            assert len(set(handles)) == len(handles)
        expected = []
        for inst, keys in model.items():
            run = 0
            while run < len(query) and query[run] in keys:
                run += 1
            if run:
                expected.append((inst, run))
        expected.sort(key=lambda x: (-x[1], x[0]))
        assert [(h.instance, h.run) for h in index.lookup(NS, query, 0.0)] == expected
        for inst, keys in model.items():
            assert index.keys_of(inst) == keys and index.member(inst).chunks == len(keys)
        while index.sweeping:
            index.sweep(2)
        assert index.num_chunks == len(set().union(*model.values()))
        assert not model or all(v is not None for v in index._spaces[NS].table.values())
        if not model:
            assert index._spaces == {}


def test_lookup_answers_name_the_holders_registration_epoch():
    """The puller names this epoch in its data-plane requests (issue 13): a process that
    reuses the address under a new epoch refuses them."""
    index = DirectoryIndex(LEASE)
    reg(index, A, epoch=1234)
    pub(index, Seq(), A, added=K[:2])
    (holder,) = index.lookup(NS, K[:2], 0.0)
    assert (holder.instance, holder.run, holder.epoch) == (A, 2, 1234)
