"""Where each puller rank gets its slice of a run of chunks: pure planning, no I/O.

The scheduler side decides for all of its instance's worker ranks at once. A directory
lookup answers with *holder ranks* (every registered rank of every engine holding a leading
run of the keys, each with its :class:`~p2pkv.slices.KVSlice`); for each engine this module
finds, for every puller rank, the holder ranks whose slices cover the puller's slice, and the
part (heads × layers) to take from each. The engine's hit run is the shortest run among the
holder ranks used: a chunk counts only when every part every puller rank needs is held.

NOTE: one load takes all its parts from one engine. Two engines at different TP compute KV
that may differ in the last float bit (different all-reduce orders), so mixing their slices
would build a cache that neither computed; a puller must end up with one holder's bytes.

Called by :class:`p2pkv.vllm.scheduler.SchedulerSide`; unit-tested with constructed holder
lists (``tests/test_vllm_sources.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from p2pkv.keys import InstanceId
from p2pkv.slices import KVSlice
from p2pkv.transport.identity import HolderKey, holder_key


class HolderRank(Protocol):
    """What the planner reads of a lookup's holder (``directory.protocol.Holder``)."""

    instance: InstanceId
    address: str
    run: int
    engine: str
    slice: KVSlice | None
    epoch: int
    key: str


@dataclass(frozen=True, slots=True)
class Source:
    """Pull ``part`` of each chunk from the holder rank at ``address``, which stores
    ``holder`` (``part`` lies inside both ``holder`` and the puller rank's slice)."""

    address: str
    instance: InstanceId
    holder: KVSlice
    part: KVSlice
    epoch: int = 0
    """The holder's instance epoch from the lookup (0: not known, not checked): the holder
    refuses a pull that names another (the address was reused)."""
    key: HolderKey | None = None
    """The holder instance's public key from the lookup (None: not known, not checked): the
    puller refuses a data plane at ``address`` that cannot prove it
    (``transport/identity.py``)."""


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """One engine's parts for every puller rank (``per_rank[r]``: rank r's sources, in head
    order), valid for the leading ``run`` keys."""

    engine: str
    run: int
    per_rank: tuple[tuple[Source, ...], ...]

    @property
    def addresses(self) -> list[str]:
        return sorted({s.address for sources in self.per_rank for s in sources})


def plan_sources(holders: Iterable[HolderRank], wanted: Sequence[KVSlice], *,
                 exact_only: bool = False) -> SourcePlan | None:
    """The best engine's sources for puller ranks whose slices are ``wanted`` (by rank), or
    None when no engine covers every rank. Best: longest run, then fewest sources.

    A holder without a slice holds the whole model (a TP 1 instance, or a peer that predates
    slices). ``exact_only``: use only holder ranks whose slice equals the puller rank's
    (layouts where a head range is not contiguous, e.g. GPU caches).
    """
    if not wanted:
        return None
    shape = wanted[0]
    engines: dict[str, dict[KVSlice, HolderRank]] = {}
    for h in holders:
        held = h.slice if h.slice is not None else KVSlice.whole(shape.num_heads,
                                                                 shape.num_layers)
        if not held.same_model(shape) or h.run <= 0:
            continue
        ranks = engines.setdefault(h.engine or h.instance, {})
        if held not in ranks or ranks[held].run < h.run:
            ranks[held] = h
    best: SourcePlan | None = None
    best_cost = 0
    for engine in sorted(engines):
        plan = _plan_engine(engine, engines[engine], wanted, exact_only)
        if plan is None:
            continue
        cost = sum(len(s) for s in plan.per_rank)
        if best is None or plan.run > best.run or (plan.run == best.run and cost < best_cost):
            best, best_cost = plan, cost
    return best


def _plan_engine(engine: str, ranks: dict[KVSlice, HolderRank], wanted: Sequence[KVSlice],
                 exact_only: bool) -> SourcePlan | None:
    ordered = sorted(ranks.items(), key=lambda kv: (kv[0].layer_start, kv[0].head_start))
    run = None
    per_rank = []
    for want in wanted:
        if exact_only:
            h = ranks.get(want)
            if h is None:
                return None
            parts = [(want, h, want)]
        else:
            parts = [(held, h, x) for held, h in ordered
                     if (x := held.intersect(want)) is not None]
            if sum(x.area for _, _, x in parts) != want.area or _overlap([x for *_, x in parts]):
                return None
        for _, h, _ in parts:
            run = h.run if run is None else min(run, h.run)
        per_rank.append(tuple(Source(h.address, h.instance, held, x, h.epoch,
                                     _key(h.key))
                              for held, h, x in parts))
    assert run is not None
    return SourcePlan(engine, run, tuple(per_rank))


def _key(z85: str) -> HolderKey | None:
    """A lookup's Z85 holder key as a HolderKey (None: none, or not a key: not checked,
    as from a directory without a secret)."""
    if not z85:
        return None
    try:
        return holder_key(z85)
    except ValueError:
        return None


def _overlap(parts: Sequence[KVSlice]) -> bool:
    return any(a.intersect(b) is not None
               for i, a in enumerate(parts) for b in parts[i + 1:])
