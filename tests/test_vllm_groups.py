"""Hybrid models' KV-cache groups (``p2pkv.vllm.groups``), their slot layout and pulls
(``p2pkv.vllm.layout``) and the scheduler's per-group plans, without running vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="the group specs are vLLM's")

from vllm.v1.kv_cache_interface import (  # noqa: E402
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)

from p2pkv.errors import ConfigError  # noqa: E402
from p2pkv.slices import KVSlice  # noqa: E402
from p2pkv.transport.selection import Selection  # noqa: E402
from p2pkv.vllm.groups import (  # noqa: E402
    KVGroup,
    describe,
    kv_groups,
    needed_prefix,
    slot_order,
)
from p2pkv.vllm.layout import KVLayout, pull_batches, pull_selection  # noqa: E402

F32 = torch.float32


def full(**kw):
    return FullAttentionSpec(block_size=kw.get("block_size", 4), num_kv_heads=2, head_size=8,
                             dtype=kw.get("dtype", F32))


def sliding(window, **kw):
    return SlidingWindowSpec(block_size=kw.get("block_size", 4), num_kv_heads=2, head_size=8,
                             dtype=F32, sliding_window=window)


def config(*specs):
    return SimpleNamespace(kv_cache_groups=[
        KVCacheGroupSpec([f"g{i}.l{j}" for j in range(2)], spec) for i, spec in enumerate(specs)])


def test_groups_come_full_first_then_the_widest_window():
    groups = kv_groups(config(sliding(8), full(), sliding(32)), "cpu")
    assert [(g.index, g.window) for g in groups] == [(1, None), (2, 32), (0, 8)]
    assert describe(groups) == "fullx2+sw32x2+sw8x2"
    assert describe(kv_groups(config(full()), "cpu")) == ""  # one group: signature unchanged
    assert describe(kv_groups(config(sliding(8)), "cpu")) == "sw8x2"  # nulls still matter
    assert slot_order([KVGroup(0, ("a",), 4), KVGroup(1, ("b",))])[0].index == 1


@pytest.mark.parametrize("specs, device, reason", [
    ((full(), ChunkedLocalAttentionSpec(block_size=4, num_kv_heads=2, head_size=8, dtype=F32,
                                        attention_chunk_size=16)), "cpu",
     "ChunkedLocalAttentionSpec"),
    ((full(), sliding(8, block_size=8)), "cpu", "differ in block size"),
    ((full(), full(dtype=torch.bfloat16)), "cpu", "differ in block size, dtype"),
    ((full(), sliding(8)), "cuda", "--disable-hybrid-kv-cache-manager"),
])
def test_what_cannot_be_saved_exactly_is_refused_naming_why(specs, device, reason):
    with pytest.raises(ConfigError, match=reason):
        kv_groups(config(*specs), device)


def test_a_chunk_needs_the_groups_up_to_its_last_block_to_write():
    assert needed_prefix((5, None, None), 3) == 1
    assert needed_prefix((5, 6, None), 3) == 2
    assert needed_prefix((5, None, 7), 3) == 3  # not a prefix: everything (Nones dropped)
    assert needed_prefix((None, None), 2) == 0


def hybrid_caches(blocks=6, heads=2, seed=0):
    """Four layers in two groups; as vLLM's HMA does, layer i of each group shares a tensor
    (kv_cache_tensors), so a block id names the same memory in both groups."""
    g = torch.Generator().manual_seed(seed)
    shared = [torch.randn(blocks, heads, 4, 16, generator=g) for _ in range(2)]
    caches = {"full.0": shared[0], "sw.0": shared[0], "full.1": shared[1], "sw.1": shared[1]}
    groups = (KVGroup(0, ("full.0", "full.1")), KVGroup(1, ("sw.0", "sw.1"), 8))
    return caches, KVLayout.from_kv_caches(caches).with_groups(groups)


def test_a_hybrid_slot_is_group_major_and_names_its_grouping():
    caches, layout = hybrid_caches()
    assert layout.groups == ((0, 2), (1, 3)) and layout.signature.endswith("/groupsfullx2+sw8x2")
    slot = bytearray(layout.chunk_bytes(2))
    ids = (1, 2, 3, 0)  # full group: blocks 1, 2; sliding group: 3 and the null block
    layout.copy_out(ids, memoryview(slot))
    t = [caches["full.0"], caches["full.1"]]
    want = b"".join(t[layer][b].numpy().tobytes() for b, layer in
                    [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (0, 0), (0, 1)])
    assert bytes(slot) == want


def test_a_pull_past_the_window_takes_the_full_group_only_and_writes_no_null_block():
    src_caches, src = hybrid_caches(seed=1)
    dst_caches, dst = hybrid_caches(seed=2)
    before = {k: v.clone() for k, v in dst_caches.items()}
    slot = bytearray(src.chunk_bytes(2))
    src.copy_out((1, 2, 3, 4), memoryview(slot))  # holder: every group of the chunk
    whole = KVSlice.whole(2, 4)
    ids = (4, 5, None, None)  # puller: the window has moved past this chunk
    ((k, idx),) = pull_batches(dst, [ids])
    assert (k, idx) == (1, [0])
    select = pull_selection(whole, whole, dst.head_bytes, dst.group_sizes, k, 2)
    assert select == Selection(rows=8, row_bytes=dst.block_bytes, first_row=0, num_rows=4,
                               offset=0, length=dst.block_bytes)
    sent = b"".join(bytes(slot[a:a + n]) for a, n in select.ranges(len(slot)))
    assert len(sent) == len(slot) // 2
    dest = dst.pull_dest(ids, whole, whole, k)
    assert sum(p.nbytes for p in dest) == len(sent)
    off = 0
    for p in dest:
        p[:] = sent[off:off + p.nbytes]
        off += p.nbytes
    for name, t in dst_caches.items():
        for b in range(t.shape[0]):
            if b in (4, 5):  # tensor shared by a full and a sliding layer: the full one's
                layer = ["full.0", "full.1"][0 if t is dst_caches["full.0"] else 1]
                assert torch.equal(t[b], src_caches[layer][b - 3])
            else:
                assert torch.equal(t[b], before[name][b]), (name, b)


def test_a_tp_part_of_the_first_groups_is_one_selection():
    half = KVSlice(1, 2, 2, 0, 4, 4)
    whole = KVSlice.whole(2, 4)
    s = pull_selection(whole, half, 100, (2, 2), 1, 3)
    assert s == Selection(rows=12, row_bytes=200, first_row=0, num_rows=6, offset=100,
                          length=100)
    assert pull_selection(whole, half, 100, (2, 2), 2, 3) == Selection(
        rows=4, row_bytes=200, first_row=0, num_rows=4, offset=100, length=100)


def test_chunks_are_batched_by_the_groups_they_need():
    _, layout = hybrid_caches()
    loads = [(1, 2, None, None), (3, 4, None, 5), (None, 6, 7, 8)]
    assert pull_batches(layout, loads) == [(2, [1, 2]), (1, [0])]
    one = KVLayout.from_kv_caches({"l": torch.zeros(4, 2, 4, 16)})
    assert pull_batches(one, [(1,), (None,)]) == [(1, [0, 1])]


def test_scheduler_plans_per_group_and_stops_before_the_prompts_last_token():
    from tests.test_vllm_scheduler import BLOCK, FakeDirectory, reply, request

    from p2pkv.keys import Namespace
    from p2pkv.vllm.config import ConnectorConfig
    from p2pkv.vllm.scheduler import SchedulerSide

    d = FakeDirectory([reply(4)])
    s = SchedulerSide(ConnectorConfig(directory="tcp://127.0.0.1:1"), namespace=Namespace("n"),
                      block_size=BLOCK, chunk_blocks=1, can_load=True, can_save=True,
                      directory=d, groups=(1, 0), hit_below_prompt=True)
    r = request("r", 4)  # 4 full blocks, all held: the load stops one chunk short
    assert s.get_num_new_matched_tokens(r, 0) == (3 * BLOCK, True)
    # vLLM group 0 is sliding (slot order second): nulls before its window
    s.update_state_after_alloc(r, ([None, None, 12, 13], [20, 21, 22, 23]), 3 * BLOCK)
    (plan,) = s.build_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                           scheduled_cached_reqs=SimpleNamespace(
                                               req_ids=[], num_computed_tokens=[])),
                           lambda _: ([], [])).loads
    assert [c.block_ids for c in plan.chunks] == [(20, None), (21, None), (22, 12)]
    saver = SchedulerSide(ConnectorConfig(directory="tcp://127.0.0.1:1"),
                          namespace=Namespace("n"), block_size=BLOCK, chunk_blocks=2,
                          can_load=False, can_save=True, directory=d, groups=(1, 0))
    saver.get_num_new_matched_tokens(r, 0)
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r", num_computed_tokens=0,
                                                              block_ids=([0, 0, 3, 4],
                                                                         [5, 6, 7, 8]))],
                          num_scheduled_tokens={"r": 4 * BLOCK},
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[],
                                                                num_computed_tokens=[]))
    saves = saver.build_meta(out, lambda _: ([0, 0, 3, 4], [5, 6, 7, 8]))
    assert [p.block_ids for p in saves.saves] == [(5, 6, 0, 0), (7, 8, 3, 4)]
    assert 0 not in saves.new_blocks
    assert np.array_equal(sorted(saves.new_blocks), [3, 4, 5, 6, 7, 8])


def fake_vllm_config(pp: int, tp: int, layers: int = 4, heads: int = 4):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=tp),
        model_config=SimpleNamespace(use_mla=False, hf_text_config=SimpleNamespace(
            num_hidden_layers=layers), get_total_num_kv_heads=lambda: heads),
        device_config=SimpleNamespace(device_type="cpu"))


def attention_config(layers: int, kv_heads_per_rank: int, *specs):
    specs = specs or (FullAttentionSpec(block_size=4, num_kv_heads=kv_heads_per_rank,
                                        head_size=8, dtype=F32),)
    return SimpleNamespace(kv_cache_groups=[
        KVCacheGroupSpec([f"g{i}.l{j}" for j in range(layers)], s) for i, s in enumerate(specs)])


def test_pipeline_stages_hold_their_layers_by_rank():
    from p2pkv.vllm.connector import rank_slices

    slices = rank_slices(fake_vllm_config(pp=2, tp=2), attention_config(2, 2))
    assert [(s.head_start, s.head_end, s.layer_start, s.layer_end) for s in slices] == [
        (0, 2, 0, 2), (2, 4, 0, 2), (0, 2, 2, 4), (2, 4, 2, 4)]  # rank = pp_rank * tp + tp
    assert all(s.num_layers == 4 for s in slices)
    with pytest.raises(ConfigError, match="KV cache layers"):  # stage 0 is not 2 layers
        rank_slices(fake_vllm_config(pp=2, tp=1), attention_config(3, 4))
    with pytest.raises(ConfigError, match="pipeline parallelism with several KV cache"):
        rank_slices(fake_vllm_config(pp=2, tp=1), config(full(), sliding(8)))


def test_a_hybrid_worker_pulls_each_chunks_groups_over_tcp_and_fails_per_request():
    from p2pkv.keys import ChunkKey, InstanceId, Namespace
    from p2pkv.transport.peer import PeerTransport
    from p2pkv.vllm.config import ConnectorConfig
    from p2pkv.vllm.metadata import ChunkLoad, LoadPlan, P2PKVMetadata, SavePlan
    from p2pkv.vllm.sources import Source
    from p2pkv.vllm.worker import WorkerSide
    from tests.test_vllm_worker import RecordingDirectory, wait_finished

    def worker(seed):
        caches, layout = hybrid_caches(blocks=8, seed=seed)
        d = RecordingDirectory()
        w = WorkerSide(ConnectorConfig(directory="tcp://127.0.0.1:1", store_gib=0.001,
                                       pull_timeout_s=2),
                       instance=InstanceId(f"i{seed}"), namespace=Namespace("ns"),
                       chunk_blocks=1, transport=PeerTransport(), directory=d)
        w.register_kv_caches(layout)
        return w, caches, d

    holder, h, d = worker(1)
    puller, p, _ = worker(2)
    before = {k: v.clone() for k, v in p.items()}
    far, near = ChunkKey(b"f" * 32), ChunkKey(b"n" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(far, (1, 2)), SavePlan(near, (3, 4))]))
    assert holder.wait_saved(5.0)
    whole = KVSlice.whole(2, 4)
    src = (Source(d.registered[0], InstanceId("i1"), whole, whole),)
    # the far chunk: full group only (its sliding block is vLLM's null block at the puller)
    plan = LoadPlan("r", (ChunkLoad(far, (5, None)), ChunkLoad(near, (6, 7))), (src,))
    puller.start_loads(P2PKVMetadata(loads=[plan]))
    wait_finished(puller, "r")
    assert puller.take_failed_requests() == set() and puller.take_failed_blocks() == set()
    t0, t1 = "full.0", "full.1"  # each tensor is shared by a full and a sliding layer
    for t in (t0, t1):
        assert torch.equal(p[t][5], h[t][1])  # far chunk, full group
        assert torch.equal(p[t][6], h[t][3])  # near chunk, full group
        assert torch.equal(p[t][7], h[t][4])  # near chunk, sliding group
        for b in (0, 1, 2, 3, 4):
            assert torch.equal(p[t][b], before[t][b])
    assert puller.counters.bytes_pulled == 3 * 2 * p[t0][0].numel() * 4  # 3 blocks x 2 layers
    missing = LoadPlan("m", (ChunkLoad(ChunkKey(b"x" * 32), (1, 2)),), (src,))
    puller.start_loads(P2PKVMetadata(loads=[missing]))
    wait_finished(puller, "m")
    assert puller.take_failed_requests() == {"m"}
    holder.shutdown()
    puller.shutdown()


def test_layerwise_is_refused_at_start_up_for_several_groups():
    """load_mode layerwise with a hybrid model's groups is a start-up error naming them, not a
    silent fallback; one group loads layer-wise on CPU only (GPU stays async)."""
    from p2pkv.errors import ConfigError
    from p2pkv.vllm.connector import uses_layerwise
    from p2pkv.vllm.groups import KVGroup

    full = KVGroup(0, ("l0", "l2"))
    window = KVGroup(1, ("l1", "l3"), window=256)
    with pytest.raises(ConfigError, match="one KV-cache group.*fullx2\\+sw256x2.*async"):
        uses_layerwise("layerwise", "cpu", (full, window))
    assert uses_layerwise("layerwise", "cpu", (full,))
    assert not uses_layerwise("layerwise", "cuda", (full,))
    assert not uses_layerwise("async", "cpu", (full, window))
