"""The connector's metrics: deltas, their merging, and the series they become in vLLM's
/metrics (p2pkv.vllm.stats, p2pkv.vllm.prom)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import msgspec
import pytest

from p2pkv.vllm.stats import (
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    DeltaTracker,
    StatsDelta,
    exported_names,
)


def test_tracker_hands_out_what_grew_since_the_last_take():
    t = DeltaTracker()
    t.observe("lookup_seconds", 0.002)
    first = t.take({"lookups": 2, "lookup_timeouts": 0})
    assert first.counters == {"lookups": 2}
    assert first.observations == {"lookup_seconds": [0.002]}
    assert t.take({"lookups": 2, "lookup_timeouts": 0}).is_empty()
    assert t.take({"lookups": 5, "lookup_timeouts": 1}).counters == {"lookups": 3,
                                                                      "lookup_timeouts": 1}


def test_merging_makes_a_new_delta_and_survives_msgpack():
    a = StatsDelta({"chunks_pulled": 3}, {"pull_seconds": [0.1]})
    b = StatsDelta({"chunks_pulled": 2, "lookups": 1}, {"pull_seconds": [0.2]})
    m = a.merged(b)
    assert m.counters == {"chunks_pulled": 5, "lookups": 1}
    assert m.observations == {"pull_seconds": [0.1, 0.2]}
    assert a.counters == {"chunks_pulled": 3} and a.observations == {"pull_seconds": [0.1]}
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(m.to_dict()))
    assert StatsDelta.from_dict(wire) == m
    assert m.summary() == {"chunks_pulled": 5, "lookups": 1, "pull_seconds_count": 2,
                           "pull_mean_ms": 150.0}


def test_exported_names_cover_every_counter_and_histogram():
    names = exported_names()
    assert "p2pkv_connector_chunks_pulled_total" in names
    assert "p2pkv_connector_lookup_seconds_bucket" in names
    assert "p2pkv_connector_planner_peer_bytes_per_second" in names
    assert len(names) == len(COUNTERS) + 3 * len(HISTOGRAMS) + len(GAUGES)


vllm = pytest.importorskip("vllm", reason="p2pkv.vllm.prom subclasses vLLM's stats types")


def test_prom_metrics_export_exactly_the_declared_names_and_add_deltas():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from p2pkv.vllm.prom import P2PKVPromMetrics, P2PKVStats

    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry)
             for cls in (Counter, Gauge, Histogram)}
    prom = P2PKVPromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                            ["model_name", "engine"], {0: ["model", "0"]})
    worker = P2PKVStats.of(StatsDelta({"chunks_pulled": 4, "bytes_pulled": 4096},
                                      {"pull_seconds": [0.03]}))
    scheduler = P2PKVStats.of(StatsDelta(
        {"remote_hit_tokens": 512}, {"lookup_seconds": [0.001, 0.004]},
        {"planner_prefill_tokens_per_second|4096": 900.0,
         "planner_peer_bytes_per_second|b": 1e9, "planner_peer_rtt_seconds|b": 2e-4}))
    merged = worker.aggregate(scheduler)
    prom.observe(merged.to_dict(), 0)
    samples = {s.name: s for f in text_string_to_metric_families(generate_latest(registry)
                                                                  .decode())
               for s in f.samples if not s.name.endswith("_created")}
    assert set(samples) == exported_names()
    assert samples["p2pkv_connector_chunks_pulled_total"].value == 4
    assert samples["p2pkv_connector_bytes_pulled_total"].value == 4096
    assert samples["p2pkv_connector_remote_hit_tokens_total"].value == 512
    assert samples["p2pkv_connector_lookup_seconds_count"].value == 2
    assert samples["p2pkv_connector_chunks_pulled_total"].labels == {"model_name": "model",
                                                                     "engine": "0"}
    assert samples["p2pkv_connector_planner_peer_bytes_per_second"].value == 1e9
    assert samples["p2pkv_connector_planner_peer_bytes_per_second"].labels == {
        "model_name": "model", "engine": "0", "peer": "b"}
    assert not worker.is_empty() and P2PKVStats(data={}).is_empty()
    # a later delta's gauge replaces the earlier value
    later = StatsDelta(gauges={"planner_peer_bytes_per_second|b": 5e8})
    assert StatsDelta.from_dict(merged.to_dict()).merged(later).gauges[
        "planner_peer_bytes_per_second|b"] == 5e8


def test_scheduler_times_each_lookup_from_start_to_reply():
    from p2pkv.directory.client import PENDING
    from p2pkv.directory.protocol import Holder, LookupReply
    from p2pkv.keys import Namespace
    from p2pkv.vllm.config import ConnectorConfig
    from p2pkv.vllm.scheduler import SchedulerSide

    now = [10.0]
    replies = [PENDING, LookupReply(holders=[Holder(instance="a", address="h:1", run=2)])]

    class Directory:
        def start_lookup(self, namespace, keys, timeout_s):
            return 1

        def wait_lookup(self, rid, max_wait_s):
            return replies.pop(0)

        def poll_lookup(self, rid):
            return replies.pop(0)

    s = SchedulerSide(ConnectorConfig(directory="tcp://127.0.0.1:1"), namespace=Namespace("n"),
                      block_size=4, chunk_blocks=1, can_load=True, can_save=True,
                      directory=Directory(), clock=lambda: now[0])
    r = SimpleNamespace(request_id="r", block_hashes=[bytes([i]) * 32 for i in range(3)],
                        prompt_token_ids=list(range(12)))
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)
    now[0] += 0.004
    assert s.get_num_new_matched_tokens(r, 0) == (8, True)
    delta = s.take_stats()
    assert delta.counters == {"lookups": 1, "remote_hit_tokens": 8}
    assert delta.observations["lookup_seconds"] == [pytest.approx(0.004)]
    assert s.take_stats().is_empty()
