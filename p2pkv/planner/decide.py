"""The planner's decisions, as pure functions over a :class:`CostModel` (no I/O).

- :func:`plan_load` (the connector's question): pull a peer's run of the prompt, or
  recompute it? A pull happens only when it is expected to finish the request sooner.
- :func:`choose_route` (the router's question): which instance gives the lowest expected
  time to first token: its own hit, a pull, or a recompute, under its current queue?

Times overlap as they do in vLLM: a request waits for its turn (``queue_s``) while its
host-tier blocks load and its pull runs, so the compute starts at the latest of the three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from p2pkv.planner.cost import CostModel


@dataclass(frozen=True, slots=True)
class RemoteRun:
    """A peer holding the ``tokens`` that follow the instance's own hit, contiguously."""

    peer: str
    tokens: int


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What one instance does with a prompt, and the times behind it."""

    pull: bool
    expected_s: float
    """Expected time to first token on this instance, following this plan."""
    recompute_s: float
    """Expected time to first token without the pull."""
    pull_s: float
    """Expected time of the pull alone (0 without a remote run)."""
    cached_tokens: int
    """Tokens not computed: the local hit, plus the remote run when pulled."""

    @property
    def kind(self) -> str:
        """``pull``, ``local`` (a hit, nothing to pull) or ``recompute`` (no hit)."""
        if self.pull:
            return "pull"
        return "local" if self.cached_tokens > 0 else "recompute"


def plan_load(cost: CostModel, prompt_tokens: int, local_tokens: int,
              remote: RemoteRun | None, *, host_tokens: int = 0,
              queue_s: float = 0.0) -> LoadPlan:
    """Pull ``remote`` or recompute it. ``local_tokens``: the instance's own leading hit, of
    which ``host_tokens`` sit in its host store (loaded at ``host_load`` speed)."""
    local_ready = max(queue_s, cost.host_load_s(host_tokens))
    recompute = local_ready + cost.prefill_s(prompt_tokens, local_tokens)
    if remote is None or remote.tokens <= 0:
        return LoadPlan(False, recompute, recompute, 0.0, local_tokens)
    pull_s = cost.pull_s(remote.peer, remote.tokens)
    cached = local_tokens + remote.tokens
    with_pull = max(local_ready, pull_s) + cost.prefill_s(prompt_tokens, cached)
    if with_pull < recompute:
        return LoadPlan(True, with_pull, recompute, pull_s, cached)
    return LoadPlan(False, recompute, recompute, pull_s, local_tokens)


@dataclass(frozen=True, slots=True)
class RouteCandidate:
    """One instance as the router sees it."""

    instance: str
    local_tokens: int
    queue_s: float
    host_tokens: int = 0
    remote: RemoteRun | None = None
    in_flight: int = 0
    """Requests it is serving (prefill or decode): the spread's tie-break after the queue."""


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The chosen instance and why: ``local``, ``pull`` or ``recompute`` (its plan), or
    ``reroute`` (an instance holding more of the prompt was passed over: it is busier)."""

    instance: str
    reason: str
    plan: LoadPlan
    expected: tuple[tuple[str, float], ...]
    """Every candidate's expected time to first token, in the order given."""


def choose_route(cost: CostModel, prompt_tokens: int, candidates: Sequence[RouteCandidate],
                 *, spread: float = 0.0) -> RouteChoice | None:
    """The candidate with the lowest expected time to first token (ties: listed first; a
    caller lists them least recently chosen first).

    ``spread`` > 0: of the candidates expected within that fraction of the best, the one
    with the shortest queue, then the fewest requests in flight. Where pulls are cheap this spreads load instead of piling
    every request that shares a popular prefix onto its holder, whose cache would then
    churn through everything else it holds.
    """
    if not candidates:
        return None
    plans = [plan_load(cost, prompt_tokens, c.local_tokens, c.remote, host_tokens=c.host_tokens,
                       queue_s=c.queue_s) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: (plans[i].expected_s, i))
    if spread > 0:
        limit = plans[best].expected_s * (1 + spread)
        best = min((i for i in range(len(candidates)) if plans[i].expected_s <= limit),
                   key=lambda i: (candidates[i].queue_s, candidates[i].in_flight, i))
    most_local = max(c.local_tokens for c in candidates)
    chosen = candidates[best]
    reason = ("reroute" if most_local > 0 and chosen.local_tokens < most_local
              else plans[best].kind)
    return RouteChoice(chosen.instance, reason, plans[best],
                       tuple((c.instance, p.expected_s) for c, p in zip(candidates, plans)))
