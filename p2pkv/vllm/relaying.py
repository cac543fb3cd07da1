"""One worker rank's side of its relay (``p2pkv.vllm.relay``): equal slices pulled once per
instance.

:class:`RankRelay` joins the rank's relay at ``register_kv_caches`` and holds what it got:
a :class:`~p2pkv.vllm.relay.RelayLeader` (the lowest rank of a slice that others hold too),
a :class:`~p2pkv.vllm.relay.RelayFollower` (such a sibling, on the leader's host), or
neither (the rank pulls for itself). Per load, a follower whose sources equal its leader's
takes the load from the leader's pulls (:meth:`RankRelay.take`); a leader with such
followers pulls into slots of its slab (:meth:`RankRelay.start` gives a :class:`Relaying`),
announces each pull's chunks and copies them into its own blocks. Used by
:class:`p2pkv.vllm.worker.WorkerSide`, which runs the pulls and counts the outcomes;
unit-tested through it in ``tests/test_vllm_relay.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from p2pkv.keys import ChunkKey
from p2pkv.slices import KVSlice
from p2pkv.store import digest
from p2pkv.transport.base import Outcome, PullItem, PullResult
from p2pkv.transport.land import scatter
from p2pkv.transport.selection import Selection
from p2pkv.transport.shm import copy_and_digest
from p2pkv.vllm.layout import KVLayout, pull_batches
from p2pkv.vllm.metadata import LoadPlan
from p2pkv.vllm.relay import (
    Landed,
    Relayed,
    RelayFollower,
    RelayLeader,
    RelaySetup,
    Skip,
    join_relay,
    relay_leader,
)
from p2pkv.vllm.sources import Source

logger = logging.getLogger(__name__)

RELAY_GRACE_S = 1.0
"""A follower waits for its leader's pulls this much longer than the pulls' own deadlines."""


@dataclass(frozen=True, slots=True)
class Relaying:
    """A load this rank pulls for ``followers`` too: part ``p``'s chunk ``i`` lands in
    ``slots[p * len(plan.chunks) + i]`` of the leader's slab."""

    leader: RelayLeader
    plan: LoadPlan
    parts: int
    followers: tuple[int, ...]
    slots: tuple[int, ...]

    def slot(self, part: int, chunk: int) -> int:
        return self.slots[part * len(self.plan.chunks) + chunk]

    def items(self, part: int, idx: list[int], dests: list[tuple],
              select: Selection | None) -> list[PullItem]:
        """One pull's items for part ``part``'s chunks ``idx``: into their slots, each sized
        to its blocks' destination ``dests``."""
        return [PullItem(self.plan.chunks[i].key,
                         (self.leader.view(self.slot(part, i), sum(d.nbytes for d in dest)),),
                         select)
                for i, dest in zip(idx, dests)]

    def landed(self, part: int, idx: list[int], items: list[PullItem],
               got: list[PullResult], dests: list[tuple]) -> None:
        """Announce one pull's chunks (landed in their slots) to the followers, then copy the
        good ones into this rank's blocks ``dests``."""
        entries = [Relayed(i, self.slot(part, i), item.nbytes, digest(item.dest[0]), "ok")
                   if r.outcome is Outcome.OK else
                   Relayed(i, self.slot(part, i), 0, 0, r.outcome.value, r.reason)
                   for i, item, r in zip(idx, items, got)]
        self.leader.announce(Landed(self.plan.req_id, part, entries), self.followers)
        for item, r, dest in zip(items, got, dests):
            if r.outcome is Outcome.OK:
                scatter(np.frombuffer(item.dest[0], dtype=np.uint8), dest)

    def fail(self, reason: str) -> None:
        """Announce every chunk of every part failed: the followers fail them at once."""
        n = len(self.plan.chunks)
        for p in range(self.parts):
            self.leader.announce(Landed(self.plan.req_id, p, [
                Relayed(i, self.slot(p, i), 0, 0, "failed", reason) for i in range(n)]),
                self.followers)


@dataclass(frozen=True, slots=True)
class TakenLoad:
    """A follower's load, taken from its leader's pulls: per part (the rank's sources) the
    chunks' results, and how many chunks and bytes arrived good."""

    per_source: list[list[PullResult]]
    chunks: int
    nbytes: int


class RankRelay:
    """One rank's relay: its leader or follower end (or neither), joined at registration."""

    def __init__(self, setup: RelaySetup | None, rank: int, *, pull_timeout_s: float) -> None:
        self._setup = setup
        self._rank = rank
        self._pull_timeout_s = pull_timeout_s
        self._layout: KVLayout | None = None
        self._slice: KVSlice | None = None
        self.leader: RelayLeader | None = None
        self.follower: RelayFollower | None = None

    def join(self, layout: KVLayout, slice: KVSlice, slot_bytes: int) -> None:
        """At ``register_kv_caches``: join the relay (CPU caches only; every rank calls)."""
        self._layout, self._slice = layout, slice
        setup = self._setup
        # NOTE: every rank of the instance gets here with the same setup and device type, so
        # either all of them join (join_relay's exchange is a collective) or none does.
        if setup is None or layout.on_gpu or not layout.head_bytes:
            return
        hold_s = self._pull_timeout_s * (layout.num_groups + 1) + RELAY_GRACE_S
        got = join_relay(setup, self._rank, slot_bytes=slot_bytes, hold_s=hold_s)
        if isinstance(got, RelayLeader):
            self.leader = got
        elif isinstance(got, RelayFollower):
            self.follower = got

    def leader_rank(self) -> int:
        assert self._setup is not None
        return relay_leader(self._setup.slices, self._rank)

    def follows(self, plan: LoadPlan, sources: tuple[Source, ...]) -> bool:
        """This rank takes the load from its leader's pulls (same sources, leader alive)."""
        if self.follower is None or not self.follower.alive:
            return False
        lead = self.leader_rank()
        return lead < len(plan.sources) and plan.sources[lead] == sources

    def start(self, plan: LoadPlan, sources: tuple[Source, ...]) -> Relaying | None:
        """A leader with followers that need this load's very parts: slots for them (else a
        Skip: every rank pulls for itself)."""
        leader = self.leader
        if leader is None:
            return None
        followers = sorted(r for r in leader.followers
                           if r < len(plan.sources) and plan.sources[r] == sources)
        if not followers:
            return None
        slots = leader.acquire(plan.req_id, len(sources) * len(plan.chunks), followers)
        if slots is None:
            logger.info("p2pkv relay: no free slots for %s (%d chunks); every rank pulls it",
                        plan.req_id, len(plan.chunks))
            leader.announce(Skip(plan.req_id, "no free relay slots"), followers)
            return None
        return Relaying(leader, plan, len(sources), tuple(followers), tuple(slots))

    def take(self, plan: LoadPlan, sources: tuple[Source, ...]) -> TakenLoad | None:
        """A follower's load: wait for the leader's announcements and copy each announced
        slot into this rank's blocks, checking the leader's digest; None when this rank does
        not follow the load or the leader skipped it (pull it yourself)."""
        if not self.follows(plan, sources):
            return None
        layout, follower = self._layout, self.follower
        assert layout is not None and self._slice is not None and follower is not None
        batches = pull_batches(layout, [c.block_ids for c in plan.chunks])
        deadline = time.monotonic() + self._pull_timeout_s * len(batches) + RELAY_GRACE_S
        got = follower.collect(plan.req_id, len(sources), len(plan.chunks), deadline)
        if got.skipped:
            logger.info("p2pkv relay: rank %d pulls %s itself (%s)", self._rank, plan.req_id,
                        got.skipped)
            return None
        out: list[list[PullResult]] = []
        good = taken = 0
        for p, source in enumerate(sources):
            results: list[PullResult] = [PullResult(c.key, Outcome.FAILED, "") for c in
                                         plan.chunks]
            for k, idx in batches:
                for i in idx:
                    dest = layout.pull_dest(plan.chunks[i].block_ids, self._slice,
                                            source.part, k)
                    results[i] = self._take_one(follower, plan.chunks[i].key,
                                                got.parts[p].get(i), dest, got.why)
                    if results[i].outcome is Outcome.OK:
                        good += 1
                        taken += sum(d.nbytes for d in dest)
            out.append(results)
        follower.taken(plan.req_id, good, taken)
        return TakenLoad(out, good, taken)

    @staticmethod
    def _take_one(follower: RelayFollower, key: ChunkKey, entry: Relayed | None, dest: tuple,
                  why: str) -> PullResult:
        if entry is None:
            return PullResult(key, Outcome.FAILED, f"relay: {why}")
        if entry.outcome != Outcome.OK.value:
            outcome = Outcome.MISSING if entry.outcome == Outcome.MISSING.value \
                else Outcome.FAILED
            return PullResult(key, outcome, f"relay rank: {entry.reason}")
        if entry.nbytes != sum(d.nbytes for d in dest):
            return PullResult(key, Outcome.FAILED, f"relay: {entry.nbytes} B announced, "
                              f"{sum(d.nbytes for d in dest)} B expected")
        try:
            src = follower.slot(entry.slot, entry.nbytes)
        except ValueError as e:
            return PullResult(key, Outcome.FAILED, f"relay: {e}")
        if copy_and_digest(src, dest) != entry.digest:
            # NOTE: the leader reused the slot (this rank was slower than its hold)
            return PullResult(key, Outcome.FAILED, "relay: checksum mismatch")
        return PullResult(key, Outcome.OK)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        if self.leader is not None:
            self.leader.close()
