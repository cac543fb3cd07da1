"""Choosing an instance for a request: pure scoring, no I/O (unit-tested with fake instances).

Each candidate's score is the number of prompt tokens it already holds, minus a penalty for
being much busier than the least busy candidate: ``slack`` extra in-flight requests are
free, each one beyond costs ``tokens_per_request`` cached tokens. The highest score wins;
ties go to the less busy candidate, then to the one listed first (the caller lists them
least recently chosen first, so equal instances take turns).

With a planner profile (``Policy.planner``) the choice is the planner's instead
(:func:`choose_planned`, the same ``planner/decide.py`` code ``p2pkv bench trace`` runs): the
lowest expected time to first token, each candidate's own hit against pulling the best
holder's run against recomputing, under its queue; then the least busy of those expected
within ``spread`` of the best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from p2pkv.planner.cost import CostModel
from p2pkv.planner.decide import RemoteRun, RouteCandidate, choose_route
from p2pkv.planner.profiles import PROFILES


@dataclass(frozen=True, slots=True)
class Policy:
    tokens_per_request: int = 1024
    """Cached tokens one in-flight request beyond the slack is worth."""
    slack: int = 2
    """In-flight requests a holder may have beyond the least busy candidate, for free."""
    planner: str = ""
    """A profile of ``planner/profiles.py``: route by the planner's expected TTFT ("": by the
    cache-affinity score above)."""
    spread: float = 0.1
    """With the planner: candidates expected within this fraction of the best are equal."""

    def __post_init__(self) -> None:
        if self.tokens_per_request < 0 or self.slack < 0:
            raise ValueError("Policy.tokens_per_request and slack must not be negative")
        if self.planner and self.planner not in PROFILES:
            raise ValueError(f"planner profile {self.planner!r} is not one of {sorted(PROFILES)}")
        if self.spread < 0:
            raise ValueError("Policy.spread must not be negative")


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    cached_tokens: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    score: int


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen instance, why, and every candidate's score (for the debug log and metrics).

    ``reason``: ``cache`` (the chosen one holds the most of the prompt), ``load`` (a holder
    of more was passed over because it is much busier), ``spread`` (nobody holds any of it);
    with the planner its reasons: ``local``, ``pull``, ``recompute``, ``reroute``.
    """

    name: str
    reason: str
    cached_tokens: int
    scores: tuple[Scored, ...]
    expected_s: tuple[tuple[str, float], ...] = ()
    """With the planner: each candidate's expected time to first token."""

    def describe(self) -> str:
        return ", ".join(f"{s.candidate.name}: cached={s.candidate.cached_tokens} "
                         f"in_flight={s.candidate.in_flight} score={s.score}"
                         for s in self.scores)


def choose(candidates: Sequence[Candidate], policy: Policy) -> Choice | None:
    """The best candidate, or None when there is none."""
    if not candidates:
        return None
    least = min(c.in_flight for c in candidates)
    scored = tuple(Scored(c, c.cached_tokens - policy.tokens_per_request
                          * max(0, c.in_flight - least - policy.slack))
                   for c in candidates)
    order = sorted(range(len(scored)),
                   key=lambda i: (-scored[i].score, scored[i].candidate.in_flight, i))
    best = scored[order[0]].candidate
    most = max(c.cached_tokens for c in candidates)
    reason = ("spread" if most == 0 else "cache" if best.cached_tokens == most else "load")
    return Choice(best.name, reason, best.cached_tokens, scored)


def choose_planned(candidates: Sequence[Candidate], prompt_tokens: int, cost: CostModel,
                   *, spread: float = 0.1) -> Choice | None:
    """The planner's choice (``planner.decide.choose_route``) among ``candidates``.

    The router knows each instance's cached tokens (feed and hints) and requests in flight,
    not its queue: it takes each request in flight as one more prefill of this prompt's
    length ahead of it (``queue_s``). A candidate holding less than the best holder may pull
    the difference from it. Scores are minus the expected milliseconds."""
    if not candidates:
        return None
    per_request = cost.prefill_s(prompt_tokens, 0)
    top = max(candidates, key=lambda c: c.cached_tokens)
    route = []
    for c in candidates:
        remote = None
        if top.cached_tokens > c.cached_tokens and top.name != c.name:
            remote = RemoteRun(top.name, top.cached_tokens - c.cached_tokens)
        route.append(RouteCandidate(c.name, c.cached_tokens, c.in_flight * per_request,
                                    remote=remote, in_flight=c.in_flight))
    choice = choose_route(cost, prompt_tokens, route, spread=spread)
    assert choice is not None
    best = next(c for c in candidates if c.name == choice.instance)
    scores = tuple(Scored(c, -round(s * 1000)) for c, (_, s) in zip(candidates, choice.expected))
    return Choice(best.name, choice.reason, choice.plan.cached_tokens, scores, choice.expected)


def planner_cost(policy: Policy) -> CostModel | None:
    """The router's cost model for ``policy`` (None: no planner)."""
    return CostModel(PROFILES[policy.planner]) if policy.planner else None
