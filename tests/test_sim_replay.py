"""The trace simulation: caches and index helpers (pure), policies on constructed traces,
the fleet against a real directory process, and a small ``p2pkv bench trace`` end to end."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from p2pkv.bench import trace as bench_trace
from p2pkv.directory.protocol import Stats, StatsReply
from p2pkv.directory.client import DirectoryClient
from p2pkv.keys import InstanceId, Namespace
from p2pkv.planner.profiles import LLAMA31_8B_H100
from p2pkv.sim.cache import BlockLRU
from p2pkv.sim.cluster import ClusterSpec, best_per_run, leading_runs
from p2pkv.sim.directory_view import BlockKeys
from p2pkv.sim.losses import HostIndex, first_missing_reason
from p2pkv.sim.policies import P2pkvOptions, p2pkv_options, uses_directory
from p2pkv.sim.fleet import Fleet
from p2pkv.sim.processes import DirectoryProcess
from p2pkv.bench.trace import summarize
from p2pkv.sim.replay import ReplayConfig, make_policies, replay, reusable_blocks
from p2pkv.sim.trace import TraceRequest

SAMPLE = Path(__file__).parent / "data" / "mooncake_conversation_head400.jsonl"


def _req(i: int, t: float, blocks: tuple[int, ...]) -> TraceRequest:
    return TraceRequest(i, t, 512 * len(blocks), 10, blocks)


def test_lru_evicts_least_recently_used():
    lru = BlockLRU(3)
    assert lru.add([1, 2, 3]) == ([1, 2, 3], [])
    lru.touch([1])
    assert lru.add([4]) == ([4], [2])
    assert lru.add([5, 6, 7, 8]) == ([6, 7, 8], [3, 1, 4])  # 5 came and went
    assert list(lru) == [6, 7, 8]


def test_leading_runs_and_best_per_run():
    index = {1: {0, 1, 2}, 2: {0, 1}, 3: {0}}
    assert leading_runs(index, [1, 2, 3, 4]) == {0: 3, 1: 2, 2: 1}
    assert leading_runs(index, [9, 1]) == {}
    load = {0: (5, 0), 1: (0, 0), 2: (0, 1), 3: (0, 0)}
    assert best_per_run({0: 3, 1: 2, 2: 2, 3: 2}, load.__getitem__) == [(0, 3), (1, 2)]


def test_p2pkv_policy_names_say_their_mechanisms():
    assert p2pkv_options("round-robin") is None and uses_directory("p2pkv+save")
    assert p2pkv_options("p2pkv") == P2pkvOptions()
    assert p2pkv_options("p2pkv+planner+holders2+save") == P2pkvOptions(True, 2, True)
    assert p2pkv_options("p2pkv+multi") == P2pkvOptions(True, 4, True)
    with pytest.raises(ValueError, match="unknown feature 'fast'"):
        p2pkv_options("p2pkv+fast")


def test_a_missing_block_is_charged_to_the_first_reason_that_applies():
    host = HostIndex()
    host.update(1, [10, 11], [])
    host.update(0, [12], [])
    engines = {10: {1}, 11: {1}, 12: {0}, 13: {2}}

    def why(block: int, **kw) -> str:
        args = dict(refused=False, holder_lost=False, holders_used=1, max_holders=1,
                    host=host, engine_holders=engines)
        return first_missing_reason(block, 0, **(args | kw))

    assert why(10, refused=True) == "refused"
    assert why(10, holder_lost=True) == "holder-lost"
    assert why(10) == "next-holder"  # instance 1's store has it; one holder was used
    assert why(10, max_holders=4) == "not-published"  # the directory did not name it
    assert why(12) == "own-store"
    assert why(13) == "engine-only"
    assert why(14) == "evicted"
    host.update(1, [], [10])
    assert host.copies(10) == 0 and host.copies(11) == 1


def test_reusable_blocks_is_the_leading_run_seen_before():
    trace = [_req(0, 0, (1, 2, 3)), _req(1, 1, (1, 2, 9)), _req(2, 2, (7, 1, 2))]
    assert reusable_blocks(trace) == [0, 2, 0]


def test_local_policies_on_a_constructed_trace():
    # two conversations, each turn extending the last; 4 instances
    trace = []
    for turn in range(6):
        for conv in range(2):
            base = 100 * (conv + 1)
            trace.append(_req(len(trace), len(trace) * 1.0,
                              tuple(range(base, base + 2 + 2 * turn))))
    spec = ClusterSpec(4, LLAMA31_8B_H100)
    policies = make_policies(ReplayConfig(spec, ("round-robin", "kv-aware", "global-pool")))
    replay(trace, policies, speedup=0)
    res = {p.name: summarize(p, trace[-1].arrival_s) for p in policies}
    assert res["global-pool"]["reuse_captured"] == 1.0
    assert res["kv-aware"]["reuse_captured"] == 1.0  # every turn goes to its holder
    assert res["round-robin"]["reuse_captured"] < 1.0
    for r in res.values():
        assert r["saved_tokens"] + r["recomputed_tokens"] == r["reusable_tokens"]
        assert r["requests"] == len(trace)


@pytest.fixture
def directory():
    d = DirectoryProcess.start(heartbeat_s=0.2, liveness=5)
    yield d
    d.stop()


def test_fleet_registers_publishes_looks_up_and_keeps_leases(directory):
    """With single Heartbeats (what a fleet falls back to on a directory without batches)."""
    keys = BlockKeys(4)
    held: dict[int, list[int]] = {i: [] for i in range(50)}
    fleet = Fleet(directory.endpoint, Namespace("t"), [InstanceId(f"i{i}") for i in range(50)],
                  keys_of=lambda i: keys.flat(held[i]), address_of=lambda i: f"10.0.0.{i}:1",
                  batch_heartbeats=False)
    admin = DirectoryClient(directory.endpoint)
    try:
        fleet.start(10)
        assert fleet.registered == 50
        held[7] = [1, 2, 3]
        fleet.publish(7, keys.flat([1, 2, 3]), [])
        reply = fleet.lookup(keys.flat([1, 2, 3, 4]), 2.0)
        assert reply is not None and reply.holders[0].instance == "i7"
        assert reply.holders[0].run == 12
        deadline = time.monotonic() + 2.0  # 2 s = 2 leases: heartbeats must keep them
        while time.monotonic() < deadline:
            fleet.service(0.02)
        stats = admin.call(Stats(), 5)
        assert isinstance(stats, StatsReply)
        assert len(stats.instances) == 50 and stats.expirations == 0 and stats.chunks == 12
        assert fleet.stats.by_kind["Heartbeat"] >= 50 * 5
    finally:
        fleet.close()
        admin.close()


def test_bench_trace_small_replay(tmp_path):
    """20 instances, 200 requests, six policies, a real directory: the normal suite's
    end-to-end run of ``p2pkv bench trace``."""
    parser = argparse.ArgumentParser()
    bench_trace.add_args(parser)
    args = parser.parse_args(["--trace", str(SAMPLE), "--limit", "200", "--instances", "20",
                              "--speedup", "0", "--sweep", "10,20", "--out", str(tmp_path)])
    assert bench_trace.main(args) == 0
    report = json.loads((tmp_path / "trace.json").read_text())
    res = {r["policy"]: r for r in report["run"]["results"]}
    assert list(res) == ["round-robin", "kv-aware", "p2pkv", "p2pkv+planner",
                         "p2pkv+planner+save", "p2pkv+multi", "global-pool"]
    reusable = res["global-pool"]["reusable_tokens"]
    assert reusable > 0 and res["global-pool"]["reuse_captured"] == 1.0
    for r in res.values():
        assert r["requests"] == 200
        assert 0 <= r["saved_tokens"] <= reusable == r["reusable_tokens"]
    assert res["p2pkv"]["pulled_tokens"] > 0
    assert res["p2pkv"]["saved_tokens"] > res["round-robin"]["saved_tokens"]
    for name in ("p2pkv", "p2pkv+planner", "p2pkv+planner+save", "p2pkv+multi"):
        # every reusable token not served is charged to exactly one reason
        assert sum(res[name]["losses"]["tokens"].values()) == res[name]["recomputed_tokens"]
        client = res[name]["directory_client"]
        assert client["registrations"] == 20 and client["lookups_failed"] == 0
        assert client["lookups"] > 0 and client["errors"] == {}
    d = report["run"]["directory"]
    [proc] = d["processes"]
    assert proc["instances"] == 80 and proc["chunks"] > 0 and proc["lookups"] > 0
    assert d["lookups_failed"] == 0 and d["messages_per_s"] > 0
    assert [p["instances"] for p in report["sweep"]] == [10, 20]
    assert (tmp_path / "trace.png").stat().st_size > 0


def test_bench_trace_kill_a_shard_under_the_replay(tmp_path):
    """Two shards with replicas; s0's primary is killed mid-replay and restarted: no lookup
    fails, and the restarted process resyncs."""
    parser = argparse.ArgumentParser()
    bench_trace.add_args(parser)
    args = parser.parse_args(["--trace", str(SAMPLE), "--limit", "200", "--instances", "20",
                              "--speedup", "12", "--policies", "p2pkv,p2pkv+planner",
                              "--shards", "2", "--replica", "--kill-shard-after", "1",
                              "--restart-after", "1", "--out", str(tmp_path)])
    assert bench_trace.main(args) == 0
    run = json.loads((tmp_path / "trace.json").read_text())["run"]
    d = run["directory"]
    assert d["lookups_failed"] == 0
    assert [e["event"] for e in d["events"]][:2] == ["killed", "restarted"]
    assert len(d["processes"]) == 4
    for r in run["results"]:
        assert r["requests"] == 200 and r["directory_client"]["lookups_failed"] == 0
