"""Where a p2pkv policy loses reusable prefix tokens against the global pool, per request.

Used by the p2pkv policies (``sim/policies.py``) and reported by ``p2pkv bench trace``
(``losses`` in each p2pkv policy's result). The simulation knows the truth the directory
only approximates: which instance's host store (what peers can pull) and engine cache
(what only its owner can use) hold each block right now. A request that got fewer leading
blocks from cache than were reusable (seen before: what the global pool would have served)
is charged, whole, to the reason its first missing block was not had:

- ``refused``: the planner skipped a pull it expected to lose against recomputing;
- ``holder-lost``: the holder the lookup named no longer had the block (a lookup racing an
  eviction; the connector recomputes from the first missing chunk);
- ``next-holder``: another instance's host store had it, but the pull had used its
  ``max_holders`` (the connector pulls from one holder);
- ``not-published``: a host store had it but the directory's answer did not say so
  (a lookup racing a publish);
- ``own-store``: the puller's own store had it, past the gap the pull left (one lookup
  asks for holders of the run from the first missing key, and the puller is not one);
- ``engine-only``: only engine caches had it (pulled or hit blocks are not saved to the
  store, and engine caches are not shared);
- ``evicted``: nobody had it any more (cluster capacity, or where copies were evicted).
"""

from __future__ import annotations

from collections import Counter

REASONS = ("refused", "holder-lost", "next-holder", "not-published", "own-store", "engine-only",
           "evicted")


class HostIndex:
    """block -> instances whose host store holds it (the truth behind the directory)."""

    __slots__ = ("holders",)

    def __init__(self) -> None:
        self.holders: dict[int, set[int]] = {}

    def update(self, i: int, added: list[int], evicted: list[int]) -> None:
        holders = self.holders
        for b in added:
            holders.setdefault(b, set()).add(i)
        for b in evicted:
            s = holders.get(b)
            if s is not None:
                s.discard(i)
                if not s:
                    del holders[b]

    def copies(self, block: int) -> int:
        s = self.holders.get(block)
        return len(s) if s else 0


class LossTally:
    """Reusable tokens not served, by reason (tokens and requests)."""

    __slots__ = ("tokens", "requests")

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def charge(self, reason: str, tokens: int) -> None:
        assert reason in REASONS, reason
        if tokens > 0:
            self.tokens[reason] += tokens
            self.requests[reason] += 1

    def as_dict(self) -> dict:
        return {"tokens": {r: self.tokens[r] for r in REASONS},
                "requests": {r: self.requests[r] for r in REASONS}}


def first_missing_reason(block: int, puller: int, *, refused: bool, holder_lost: bool,
                         holders_used: int, max_holders: int, host: HostIndex,
                         engine_holders: dict[int, set[int]]) -> str:
    """Why ``block`` (the request's first reusable block not served on ``puller``) was not
    had. ``engine_holders``: block -> instances holding it in either tier."""
    if refused:
        return "refused"
    if holder_lost:
        return "holder-lost"
    others = host.holders.get(block)
    if others and (others - {puller}):
        return "next-holder" if holders_used >= max_holders else "not-published"
    if others:
        return "own-store"
    anywhere = engine_holders.get(block)
    if anywhere and (anywhere - {puller}):
        return "engine-only"
    return "evicted"
