"""A simulated instance's KV: the engine's own cache and the host store, each an LRU of
prefix blocks (trace hash ids), plus its prefill queue.

Used by the trace bench's policies (``sim/policies.py``). Blocks are the trace's 512-token
blocks: the granularity at which the trace says what is shared. Evictions are returned, so a
caller can publish them (p2pkv) or update a routing index (KV-aware routing).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class BlockLRU:
    """Blocks by recency; adding beyond ``capacity`` evicts the least recently used."""

    __slots__ = ("capacity", "_blocks")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("BlockLRU capacity must not be negative")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self):
        return iter(self._blocks)

    def touch(self, blocks: Iterable[int]) -> None:
        """Mark held blocks as just used (others are ignored)."""
        move = self._blocks.move_to_end
        for b in blocks:
            if b in self._blocks:
                move(b)

    def add(self, blocks: Iterable[int]) -> tuple[list[int], list[int]]:
        """Insert (or touch) ``blocks`` in order; returns (newly added, evicted). A block
        added and evicted by the same call is in neither list."""
        added: list[int] = []
        evicted: list[int] = []
        if self.capacity == 0:
            return added, evicted
        table = self._blocks
        for b in blocks:
            if b in table:
                table.move_to_end(b)
                continue
            table[b] = None
            added.append(b)
            if len(table) > self.capacity:
                old, _ = table.popitem(last=False)
                evicted.append(old)
        if evicted:
            gone = set(evicted) & set(added)
            if gone:
                added = [b for b in added if b not in gone]
                evicted = [b for b in evicted if b not in gone]
        return added, evicted


@dataclass(slots=True)
class LocalHit:
    """An instance's own leading hit on a prompt."""

    blocks: int
    """Leading blocks held in either tier."""
    host_only: int
    """Of those, blocks held only in the host store (they load at host-tier speed)."""


@dataclass(slots=True)
class SimInstance:
    """One simulated engine: two KV tiers and a prefill queue."""

    index: int
    device: BlockLRU
    host: BlockLRU
    link_factor: float = 1.0
    """Bandwidth of this instance's link relative to the profile's (a slow NIC or path)."""
    busy_until: float = 0.0
    """Simulated time its prefill queue is busy until."""
    requests: int = 0
    busy_s: float = 0.0

    def local_hit(self, blocks: Sequence[int]) -> LocalHit:
        device, host = self.device, self.host
        n = host_only = 0
        for b in blocks:
            if b in device:
                n += 1
            elif b in host:
                n += 1
                host_only += 1
            else:
                break
        return LocalHit(n, host_only)

    def holds(self, block: int) -> bool:
        return block in self.device or block in self.host
