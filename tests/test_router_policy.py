"""Router scoring and selection with fake instances (no vLLM, no I/O)."""

from __future__ import annotations

import pytest

from p2pkv.router.policy import Candidate, Policy, choose


def test_the_instance_holding_most_of_the_prompt_wins():
    c = choose([Candidate("a", 0, 0), Candidate("b", 512, 1), Candidate("c", 256, 0)], Policy())
    assert (c.name, c.reason, c.cached_tokens) == ("b", "cache", 512)
    assert {s.candidate.name: s.score for s in c.scores} == {"a": 0, "b": 512, "c": 256}


def test_a_much_busier_holder_is_passed_over():
    policy = Policy(tokens_per_request=1024, slack=2)
    busy = [Candidate("holder", 1024, 5), Candidate("idle", 0, 0)]
    c = choose(busy, policy)
    assert (c.name, c.reason) == ("idle", "load")  # 3 beyond slack: 1024 - 3*1024 < 0
    # within the slack the holder keeps it
    assert choose([Candidate("holder", 1024, 2), Candidate("idle", 0, 0)], policy).name == "holder"


def test_without_cache_the_least_busy_wins_then_the_first_listed():
    c = choose([Candidate("a", 0, 2), Candidate("b", 0, 1), Candidate("c", 0, 1)], Policy())
    assert (c.name, c.reason) == ("b", "spread")


def test_equal_cache_goes_to_the_less_busy_holder():
    assert choose([Candidate("a", 300, 1), Candidate("b", 300, 0)], Policy()).name == "b"


def test_no_candidates_and_bad_policy():
    assert choose([], Policy()) is None
    with pytest.raises(ValueError):
        Policy(slack=-1)


# -- the planner's routing (Policy.planner): the code p2pkv bench trace runs ---------------

def _planned(candidates, prompt_tokens=8192, spread=0.0):
    from p2pkv.planner.cost import CostModel
    from p2pkv.planner.profiles import PROFILES
    from p2pkv.router.policy import choose_planned

    return choose_planned(candidates, prompt_tokens, CostModel(PROFILES["llama3.1-8b-h100"]),
                          spread=spread)


def test_planner_keeps_an_idle_holder():
    c = _planned([Candidate("holder", 8192, 0), Candidate("idle", 0, 0)])
    assert (c.name, c.reason, c.cached_tokens) == ("holder", "local", 8192)
    assert dict(c.expected_s)["holder"] < dict(c.expected_s)["idle"]
    assert {s.candidate.name: s.score for s in c.scores}["holder"] == \
        -round(dict(c.expected_s)["holder"] * 1000)


def test_planner_reroutes_from_a_loaded_holder_to_an_idle_instance_that_pulls():
    c = _planned([Candidate("holder", 8192, 6), Candidate("idle", 0, 0)])
    assert (c.name, c.reason) == ("idle", "reroute")
    assert c.cached_tokens == 8192  # it pulls the holder's run (a fast H100 link)


def test_planner_without_any_holder_recomputes_on_the_least_busy():
    c = _planned([Candidate("a", 0, 2), Candidate("b", 0, 0), Candidate("c", 0, 1)])
    assert (c.name, c.reason, c.cached_tokens) == ("b", "recompute", 0)


def test_pool_routes_by_the_planner_when_the_policy_names_a_profile():
    from p2pkv.router.metrics import RouterMetrics
    from p2pkv.router.pool import InstanceSpec, Pool
    from p2pkv.router.prompts import PromptKeys

    class Held:
        def __init__(self, runs):
            self.runs = runs

        def run(self, instance, keys):
            return self.runs.get(instance, 0)

    prompt = PromptKeys(num_tokens=64 * 128, keys=tuple(bytes([i]) * 32 for i in range(64)),
                        full_chunks=64, chunk_tokens=128)
    specs = [InstanceSpec.parse("holder=http://127.0.0.1:1"),
             InstanceSpec.parse("idle=http://127.0.0.1:2")]
    metrics = RouterMetrics()
    pool = Pool("both", specs, Held({"holder": 64}), Policy(planner="llama3.1-8b-h100",
                                                            spread=0.0), metrics)
    pool.backends[0].in_flight = 6
    backend, choice = pool.choose(prompt, set())
    assert (backend.id, choice.reason) == ("idle", "reroute")
    assert b"p2pkv_router_expected_ttft_seconds" in metrics.render()
    # the cache-affinity scorer keeps the loaded holder: 8192 - 4 x 1024 beyond the slack > 0
    plain = Pool("both", specs, Held({"holder": 64}), Policy(), RouterMetrics())
    plain.backends[0].in_flight = 6
    backend, choice = plain.choose(prompt, set())
    assert (backend.id, choice.reason, choice.expected_s) == ("holder", "cache", ())
    with pytest.raises(ValueError):
        Policy(planner="no-such-profile")
