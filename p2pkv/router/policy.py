"""Choosing an instance for a request: pure scoring, no I/O (unit-tested with fake instances).

Each candidate's score is the number of prompt tokens it already holds, minus a penalty for
being much busier than the least busy candidate: ``slack`` extra in-flight requests are
free, each one beyond costs ``tokens_per_request`` cached tokens. The highest score wins;
ties go to the less busy candidate, then to the one listed first (the caller lists them
least recently chosen first, so equal instances take turns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    tokens_per_request: int = 1024
    """Cached tokens one in-flight request beyond the slack is worth."""
    slack: int = 2
    """In-flight requests a holder may have beyond the least busy candidate, for free."""

    def __post_init__(self) -> None:
        if self.tokens_per_request < 0 or self.slack < 0:
            raise ValueError("Policy.tokens_per_request and slack must not be negative")


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
    of more was passed over because it is much busier), ``spread`` (nobody holds any of it).
    """

    name: str
    reason: str
    cached_tokens: int
    scores: tuple[Scored, ...]

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
