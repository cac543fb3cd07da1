"""Cost model and planner decisions on constructed cases (pure, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from p2pkv.errors import ConfigError
from p2pkv.planner.cost import CostModel, Ewma, Link, PrefillCurve, length_bucket
from p2pkv.planner.decide import RemoteRun, RouteCandidate, choose_route, plan_load
from p2pkv.planner.profiles import LLAMA31_8B_H100, PROFILES, SMOLLM2_CPU

PROMPT = 12_000


def _cost(**link) -> CostModel:
    profile = LLAMA31_8B_H100
    if link:
        profile = dataclasses.replace(profile, link=Link(**link))
    return CostModel(profile)


def test_profiles_state_their_sources():
    assert LLAMA31_8B_H100.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert SMOLLM2_CPU.kv_bytes_per_token == 46_080
    for p in PROFILES.values():
        fields = {f for f, _ in p.sources}
        assert {"kv_bytes_per_token", "prefill", "link"} <= fields, p.name
    # the CPU curve reproduces the measured cold prefills it was fitted to
    assert SMOLLM2_CPU.prefill.seconds(721) == pytest.approx(3.1, rel=0.01)
    assert SMOLLM2_CPU.prefill.seconds(2950) == pytest.approx(24.0, rel=0.01)


def test_prefill_curve_counts_the_attention_of_cached_context():
    curve = PrefillCurve(tokens_per_s=1000, quad_s_per_token2=1e-6)
    assert curve.seconds(1000) == pytest.approx(1.0 + 1.0)
    # the last 500 tokens attend to the first 500: more than half the cost
    assert curve.seconds(1000, cached=500) == pytest.approx(0.5 + 0.75)
    assert curve.seconds(1000, cached=1000) == curve.seconds(1000, cached=999)
    with pytest.raises(ConfigError):
        PrefillCurve(tokens_per_s=0)


def test_slow_peer_means_recompute():
    cost = _cost(bytes_per_s=100e6, rtt_s=0.001)  # 100 MB/s: 6,144 tokens = 0.8 GB = 8 s
    plan = plan_load(cost, PROMPT, 0, RemoteRun("slow", 6144))
    assert not plan.pull and plan.kind == "recompute"
    assert plan.pull_s > plan.recompute_s


def test_fast_peer_means_pull():
    cost = _cost(bytes_per_s=40e9, rtt_s=0.0005)
    plan = plan_load(cost, PROMPT, 0, RemoteRun("fast", 6144))
    assert plan.pull and plan.kind == "pull" and plan.cached_tokens == 6144
    assert plan.expected_s < plan.recompute_s


def test_a_pull_hidden_behind_the_queue_is_free():
    cost = _cost(bytes_per_s=1e9)  # 0.8 s pull, longer than the ~0.3 s it saves...
    alone = plan_load(cost, PROMPT, 0, RemoteRun("p", 6144))
    assert not alone.pull
    queued = plan_load(cost, PROMPT, 0, RemoteRun("p", 6144), queue_s=2.0)
    assert queued.pull  # ...but the request waits 2 s for its turn anyway


def test_measured_link_overrides_the_prior():
    cost = _cost(bytes_per_s=40e9)
    assert plan_load(cost, PROMPT, 0, RemoteRun("p", 6144)).pull
    for _ in range(20):  # the peer turns out slow: 0.8 GB in 10 s
        cost.links.observe("p", 6144 * cost.profile.kv_bytes_per_token, 10.0, rtt_s=0.001)
    assert cost.links.link("p").bytes_per_s == pytest.approx(80.5e6, rel=0.01)
    assert not plan_load(cost, PROMPT, 0, RemoteRun("p", 6144)).pull
    assert plan_load(cost, PROMPT, 0, RemoteRun("other", 6144)).pull  # per peer


def test_measured_prefill_overrides_the_prior():
    cost = _cost()
    prior = cost.prefill_s(PROMPT)
    for _ in range(30):
        cost.prefill.observe(PROMPT, 0, 2 * prior)
    assert cost.prefill_s(PROMPT) == pytest.approx(2 * prior, rel=0.01)
    assert cost.prefill_s(600) == pytest.approx(cost.profile.prefill.seconds(600))  # bucket
    assert list(cost.prefill.tokens_per_s()) == [length_bucket(PROMPT)]


def test_loaded_holder_means_reroute():
    cost = _cost()
    holder = RouteCandidate("holder", local_tokens=6144, queue_s=5.0)
    idle = RouteCandidate("idle", local_tokens=0, queue_s=0.0,
                          remote=RemoteRun("holder", 6144))
    choice = choose_route(cost, PROMPT, [holder, idle])
    assert choice.instance == "idle" and choice.reason == "reroute" and choice.plan.pull
    # not loaded: the holder's own hit wins
    choice = choose_route(cost, PROMPT, [dataclasses.replace(holder, queue_s=0.0), idle])
    assert (choice.instance, choice.reason) == ("holder", "local")
    assert choose_route(cost, PROMPT, []) is None


def test_ewma():
    e = Ewma(alpha=0.5)
    assert e.update(10) == 10 and e.update(20) == 15 and e.count == 2


def test_spread_prefers_the_less_loaded_of_near_equal_candidates():
    cost = _cost()
    holder = RouteCandidate("holder", local_tokens=6144, queue_s=0.0, in_flight=3)
    idle = RouteCandidate("idle", local_tokens=0, queue_s=0.0, remote=RemoteRun("holder", 6144))
    assert choose_route(cost, PROMPT, [holder, idle]).instance == "holder"
    choice = choose_route(cost, PROMPT, [holder, idle], spread=0.1)
    assert (choice.instance, choice.reason) == ("idle", "reroute")  # a 20 ms pull is < 10 %
    far = RouteCandidate("far", local_tokens=0, queue_s=0.0)  # recompute: not within 10 %
    assert choose_route(cost, PROMPT, [holder, far], spread=0.1).instance == "holder"


def test_a_step_is_one_overhead_plus_each_requests_share():
    curve = PrefillCurve(tokens_per_s=1000, quad_s_per_token2=1e-6, overhead_s=0.01)
    # a 1,000-token prefill chunk after 500 cached, and one decode token at 2,000
    assert curve.step_seconds([(500, 1500), (2000, 2001)]) == pytest.approx(
        0.01 + 1.0 + 1e-6 * (1500**2 - 500**2) + 0.001 + 1e-6 * (2001**2 - 2000**2))
    assert curve.step_seconds([]) == pytest.approx(0.01)


def test_measured_steps_correct_the_prefill_prior_in_their_bucket():
    cost = CostModel(SMOLLM2_CPU)
    prior = cost.prefill_s(3000)
    parts = [(0, 1024)]
    cost.prefill.observe_step(3000, parts, SMOLLM2_CPU.prefill.step_seconds(parts) / 4)
    assert cost.prefill_s(3000) == pytest.approx(prior / 4)  # 4x faster than the prior
    assert cost.prefill_s(600) == pytest.approx(SMOLLM2_CPU.prefill.seconds(600))  # unmeasured
    assert cost.prefill.tokens_per_s()[4096] == pytest.approx(
        4 * 4096 / SMOLLM2_CPU.prefill.seconds(4096))


def test_fitted_links_separate_round_trip_from_bandwidth():
    from p2pkv.planner.cost import FittedLinkEstimator

    links = FittedLinkEstimator(Link(bytes_per_s=100e9), alpha=0.2, min_samples=2,
                                max_age_s=60)
    truth = Link(bytes_per_s=1e9, rtt_s=0.002)
    links.observe("b", 10_000_000, truth.seconds(10_000_000), now=0.0)
    assert links.link("b") == Link(100e9)  # one pull (it may include connecting): the prior
    for n in (1_000_000, 50_000_000, 5_000_000, 20_000_000):
        links.observe("b", n, truth.seconds(n), now=1.0)
    fit = links.link("b")
    assert fit.bytes_per_s == pytest.approx(1e9, rel=1e-6)
    assert fit.rtt_s == pytest.approx(0.002, rel=1e-3)
    # one size only: the bandwidth under the prior's round trip (0 here)
    same = FittedLinkEstimator(Link(bytes_per_s=100e9), min_samples=1)
    same.observe("c", 1_000_000, 0.01)
    assert same.link("c").bytes_per_s == pytest.approx(1e8)
    # forgotten max_age_s after the last pull: back to the prior
    links.expire(now=30.0)
    assert links.link("b") == fit
    links.expire(now=61.5)
    assert links.link("b") == Link(100e9) and links.measured() == {}


def test_cost_model_takes_a_fitted_estimator():
    from p2pkv.planner.cost import FittedLinkEstimator

    links = FittedLinkEstimator(LLAMA31_8B_H100.link, min_samples=1)
    cost = CostModel(LLAMA31_8B_H100, links=links)
    links.observe("slow", 1_000_000, 0.1)
    assert cost.pull_s("slow", 6144) > 50 * cost.pull_s("other", 6144)
