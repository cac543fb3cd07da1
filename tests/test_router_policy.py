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
