"""The scheduler side's book of leases (issue 14, tier 1): how long each finished request's
blocks may be held, and which leases end early when vLLM runs short of free blocks.

The workers decide when a lease is over (``p2pkv.vllm.lease.LeaseTable``: expiry, pulls,
pins); this book only bounds what leases may hold: a grant is refused (ttl 0: the chunks go
to the store at once) past ``max_fraction`` of vLLM's blocks or below the free-block
watermark, and under pressure the oldest leases are ended. A lease leaves the book when vLLM
reports its request in ``finished_sending`` (``done``). Pure: no I/O, no vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Held:
    blocks: int
    granted: float
    ends: float  # when the lease runs out (the book's clock; the workers time it a step later)
    ended: bool = False  # told to end (pressure); its blocks are on their way back


class LeaseBook:
    def __init__(self, lease_s: float, *, max_fraction: float, min_free_fraction: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_s = lease_s
        self._max_fraction = max_fraction
        self._min_free = min_free_fraction
        self._clock = clock
        self._held: dict[str, _Held] = {}

    def ttl(self, req_id: str, blocks: int, free: int, total: int) -> float:
        """The lease for a finished request holding ``blocks`` blocks, with ``free`` of vLLM's
        ``total`` blocks free: ``lease_s``, or 0 (no lease) past the caps. Either way the
        request is in the book until ``done``: its blocks are held for at least a step."""
        ttl = self._lease_s
        # NOTE: ``free`` excludes the request's own blocks already (vLLM frees them after
        # request_finished): a lease only keeps them from coming back
        if total <= 0 or free < self._min_free * total or \
                self.held_blocks() + blocks > self._max_fraction * total:
            ttl = 0.0
        now = self._clock()
        self._held[req_id] = _Held(blocks if ttl > 0 else 0, now, now + ttl, ended=ttl <= 0)
        return ttl

    def pressure(self, free: int, total: int) -> list[str]:
        """Leases to end now: the oldest, until the free blocks (counting those on their way
        back) reach the watermark again."""
        want = self._min_free * total - free
        if want <= 0:
            return []
        coming = sum(h.blocks for h in self._held.values() if h.ended)
        out = []
        for req_id, h in sorted(self._held.items(), key=lambda x: x[1].granted):
            if coming >= want:
                break
            if not h.ended:
                h.ended = True
                coming += h.blocks
                out.append(req_id)
        return out

    def done(self, req_ids: Iterable[str]) -> None:
        """vLLM freed these requests' blocks (``finished_sending``)."""
        for r in req_ids:
            self._held.pop(r, None)

    def next_end(self) -> float | None:
        """When the first lease neither ended nor handed back runs out (None: none is open;
        the ended ones come back when their last read ends)."""
        return min((h.ends for h in self._held.values() if not h.ended), default=None)

    def held_blocks(self) -> int:
        """Blocks of leases neither ended nor handed back."""
        return sum(h.blocks for h in self._held.values() if not h.ended)

    def __len__(self) -> int:
        return len(self._held)
