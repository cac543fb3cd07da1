"""Chunks a holder serves from outside its store: the interface the data-plane server asks.

The connector's worker serves a finished request's chunks straight from vLLM's paged blocks
while a lease holds them (``p2pkv.vllm.leases``); the server knows nothing of vLLM or leases,
only this: ``pin(key)`` gives a read of the chunk's bytes in slot order (several views, not
one slot) and its xxh3-64 digest, valid until ``unpin``; ``to_store(key)`` copies a leased
chunk into the store (for the same-host and UCX paths, which read store slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from p2pkv.keys import ChunkKey


@dataclass(frozen=True, slots=True)
class LeasedRead:
    """A chunk's bytes held for one read. ``index``/``generation`` are -1: no store slot
    (the keyed path caches hashes by slot and skips these)."""

    key: ChunkKey
    views: Sequence[memoryview]
    nbytes: int
    digest: int
    token: object  # the lender's handle for ``unpin``
    index: int = -1
    generation: int = -1


class LeasedChunks(Protocol):
    def pin(self, key: ChunkKey) -> LeasedRead | None:
        """A read of ``key`` from leased blocks; None when no live lease holds it."""

    def unpin(self, read: LeasedRead) -> None:
        """The read is done: the blocks may be handed back once no read holds them."""

    def to_store(self, key: ChunkKey) -> bool:
        """Copy a leased chunk into the store (stored already counts); False if it cannot."""
