"""The connector's planner (``p2pkv.vllm.planning``) with an injected clock (no vLLM, no I/O)."""

from __future__ import annotations

import pytest

from p2pkv.errors import ConfigError
from p2pkv.vllm.planning import (
    ConnectorPlanner,
    PullSample,
    connector_profile,
    optimistic_profile,
)

KV = 46_080  # bytes per token (SmolLM2 fp32, one rank)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _planner(clock: Clock, profile=None, **kw) -> ConnectorPlanner:
    return ConnectorPlanner(profile or optimistic_profile(KV), clock=clock, **kw)


def _measure_prefill(p: ConnectorPlanner, clock: Clock, prompt: int, tokens_per_s: float):
    """One step prefilling ``prompt`` tokens at ``tokens_per_s``."""
    p.step_scheduled([(prompt, 0, prompt)])
    clock.now += prompt / tokens_per_s
    p.step_done()


def _slow_pulls(p: ConnectorPlanner, clock: Clock, peer: str, bytes_per_s: float):
    p.observe_pulls([PullSample(peer, n, 0.001 + n / bytes_per_s)
                     for n in (KV * 128, KV * 1024, KV * 512)])


def test_a_fresh_instance_pulls_whatever_the_sizes():
    p = _planner(Clock())
    for local, remote in ((0, 128), (0, 4000), (3000, 128)):
        assert p.decide("b", 4096, local, remote).pull
    assert p.status_counters()["planner_pulls"] == 3


def test_a_measured_slow_peer_and_fast_prefill_mean_recompute():
    clock = Clock()
    p = _planner(clock)
    _measure_prefill(p, clock, 4096, tokens_per_s=20_000)  # a fast GPU
    _slow_pulls(p, clock, "slow", bytes_per_s=100e6)  # 100 MB/s: 4096 tokens = 1.9 s
    _slow_pulls(p, clock, "fast", bytes_per_s=40e9)
    plan = p.decide("slow", 4096, 0, 4000)
    assert not plan.pull and plan.pull_s > plan.recompute_s
    assert p.decide("fast", 4096, 0, 4000).pull
    # an unmeasured prompt length keeps the slow prior: pulls still win there
    assert p.decide("slow", 40_000, 0, 39_000).pull
    status = p.status_counters()
    assert status["planner_skipped"] == 1 and status["planner_peer_MBps_slow"] == 100
    assert status["planner_prefill_tok_s_4096"] == pytest.approx(20_000, rel=0.01)
    gauges = p.gauges()
    assert gauges["planner_peer_bytes_per_second|slow"] == pytest.approx(100e6, rel=1e-3)
    assert gauges["planner_peer_rtt_seconds|slow"] == pytest.approx(0.001, rel=1e-2)


def test_a_slow_peer_is_tried_again_after_link_max_age_s():
    clock = Clock()
    p = _planner(clock, link_max_age_s=60.0)
    _measure_prefill(p, clock, 4096, tokens_per_s=20_000)
    _slow_pulls(p, clock, "slow", bytes_per_s=100e6)
    assert not p.decide("slow", 4096, 0, 4000).pull
    clock.now += 61.0
    assert p.decide("slow", 4096, 0, 4000).pull  # forgotten: the optimistic prior again


def test_one_pull_alone_never_makes_a_skip():
    clock = Clock()
    p = _planner(clock)
    _measure_prefill(p, clock, 4096, tokens_per_s=20_000)
    p.observe_pulls([PullSample("b", KV * 4000, 5.0)])  # the first pull connects, say
    assert p.decide("b", 4096, 0, 4000).pull


def test_steps_pair_with_outputs_in_order_and_decode_steps_teach_nothing():
    clock = Clock()
    p = _planner(clock)
    # two steps in flight (async scheduling): the second runs once the first is back
    p.step_scheduled([(2048, 0, 2048)])
    p.step_scheduled([(2048, 2048, 1), (1024, 0, 1024)])
    clock.now += 2048 / 10_000
    p.step_done()
    clock.now += 1024 / 10_000
    p.step_done()
    rates = p.prefill_tokens_per_s()
    assert rates[2048] == pytest.approx(10_000, rel=0.01)
    assert rates[1024] == pytest.approx(10_000, rel=0.05)
    p.step_scheduled([(2048, 2049, 1)])  # decode only
    clock.now += 1.0
    p.step_done()
    p.step_done()  # an output with no step in flight is ignored
    assert p.prefill_tokens_per_s()[2048] == pytest.approx(rates[2048])


def test_profiles_for_the_connector():
    assert connector_profile("", KV).name == "optimistic"
    named = connector_profile("smollm2-135m-cpu", 1234)
    assert named.kv_bytes_per_token == 1234 and named.prefill.tokens_per_s < 400
    with pytest.raises(ConfigError):
        connector_profile("nope", KV)
