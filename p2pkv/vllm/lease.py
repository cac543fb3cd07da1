"""Leases on paged blocks (issue 14, tier 1; used by ``p2pkv.vllm.leases``).

A finished request's blocks can be kept from vLLM's free pool by ``request_finished``
returning ``delay_free=True``; vLLM frees them when every worker rank has returned the
request's id in ``finished_sending`` (see docs/architecture.md, "Serving from leased paged
blocks"). While they are held, a holder can serve the request's chunks straight from them.

:class:`LeaseTable` is one worker rank's book of those leases: which chunk (key) lies in which
leased blocks, who is reading them (pins), and when a lease ends (expiry, the puller is done,
the holder needs the memory). The rule it enforces, so that a freed and reused block is never
served as the old chunk: a lease stops taking pins the moment it ends, and its request is
handed back for ``finished_sending`` (:meth:`take_released`) only once it takes no pins and
holds none. vLLM reuses a block only after that, so every read made under a pin reads the
bytes the lease was granted over.

Pure bookkeeping: no I/O, no vLLM; thread-safe (the server's connection threads pin and unpin,
the worker's step thread grants, ends and takes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pkv.errors import P2PKVError
from p2pkv.keys import ChunkKey


class LeaseError(P2PKVError):
    """A caller bug in the use of a lease table (a lease granted twice, a pin returned twice)."""


@dataclass(frozen=True, slots=True)
class LeasePin:
    """A read of one leased chunk in progress: its blocks stay held until :meth:`unpin`."""

    req_id: str
    key: ChunkKey
    block_ids: tuple[int, ...]
    serial: int


@dataclass(slots=True)
class _Lease:
    req_id: str
    chunks: dict[ChunkKey, tuple[int, ...]]
    expires: float
    pins: set[int] = field(default_factory=set)  # serials of the pins out
    open: bool = True  # takes new pins
    why: str = ""  # why it ended


class LeaseTable:
    def __init__(self, *, max_blocks: int = 0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        """``max_blocks``: most blocks leased at once (0: no limit); a grant past it is
        refused (the request is handed back at once, its blocks freed as without a lease)."""
        self._max_blocks = max_blocks
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._by_key: dict[ChunkKey, list[str]] = {}
        self._refused: set[str] = set()
        self._serial = 0

    def grant(self, req_id: str, chunks: Sequence[tuple[ChunkKey, tuple[int, ...]]],
              ttl_s: float) -> bool:
        """Lease ``chunks`` (key, block ids) of finished request ``req_id`` for ``ttl_s``;
        False when refused (over ``max_blocks``): ``take_released`` returns it next."""
        with self._lock:
            if req_id in self._leases or req_id in self._refused:
                raise LeaseError(f"request {req_id} already has a lease")
            blocks = {b for _, ids in chunks for b in ids}
            if not chunks or ttl_s <= 0 or (
                    self._max_blocks and len(blocks | self._held()) > self._max_blocks):
                self._refused.add(req_id)
                return False
            lease = _Lease(req_id, dict(chunks), self._clock() + ttl_s)
            self._leases[req_id] = lease
            for key in lease.chunks:
                self._by_key.setdefault(key, []).append(req_id)
            return True

    def pin(self, key: ChunkKey) -> LeasePin | None:
        """Pin the chunk ``key`` in an open, unexpired lease (None: no lease serves it)."""
        with self._lock:
            now = self._clock()
            for req_id in self._by_key.get(key, ()):
                lease = self._leases[req_id]
                if lease.open and now >= lease.expires:
                    self._end(lease, "expired")
                if not lease.open:
                    continue
                self._serial += 1
                lease.pins.add(self._serial)
                return LeasePin(req_id, key, lease.chunks[key], self._serial)
            return None

    def unpin(self, pin: LeasePin) -> bool:
        """Return a pin; True when that was the last pin of an ended lease (it can be handed
        back now)."""
        with self._lock:
            lease = self._leases.get(pin.req_id)
            if lease is None or pin.serial not in lease.pins:
                raise LeaseError(f"pin {pin.serial} of {pin.req_id} is not out")
            lease.pins.discard(pin.serial)
            return not lease.open and not lease.pins

    def end(self, req_id: str, why: str) -> None:
        """End a lease early (the puller is done, the holder needs the memory): no new pins."""
        with self._lock:
            lease = self._leases.get(req_id)
            if lease is not None and lease.open:
                self._end(lease, why)

    def end_oldest(self, blocks: int, why: str = "memory pressure") -> list[str]:
        """End the leases expiring first until at least ``blocks`` blocks are on their way
        back (ended leases still pinned count: they come back when unpinned)."""
        ended: list[str] = []
        with self._lock:
            freed = 0
            for lease in sorted(self._leases.values(), key=lambda x: x.expires):
                if freed >= blocks:
                    break
                if lease.open:
                    self._end(lease, why)
                    ended.append(lease.req_id)
                freed += len({b for ids in lease.chunks.values() for b in ids})
        return ended

    def take_released(self) -> set[str]:
        """Requests whose blocks vLLM may free now (for ``finished_sending``): leases that
        ended (or expired) and have no pins out, and refused grants; each returned once."""
        with self._lock:
            now = self._clock()
            out, self._refused = self._refused, set()
            for lease in list(self._leases.values()):
                if lease.open and now >= lease.expires:
                    self._end(lease, "expired")
                if not lease.open and not lease.pins:
                    out.add(lease.req_id)
                    del self._leases[lease.req_id]
                    for key in lease.chunks:
                        holders = self._by_key[key]
                        holders.remove(lease.req_id)
                        if not holders:
                            del self._by_key[key]
            return out

    def leases(self, key: ChunkKey) -> bool:
        """Whether a lease not yet handed back holds ``key``."""
        with self._lock:
            return key in self._by_key

    def open_leases(self) -> int:
        """Leases not handed back yet (open, or ended with pins out)."""
        with self._lock:
            return len(self._leases)

    def held_blocks(self) -> set[int]:
        """Blocks of every lease not yet handed back (open or still pinned)."""
        with self._lock:
            return self._held()

    def _held(self) -> set[int]:
        return {b for lease in self._leases.values() for ids in lease.chunks.values()
                for b in ids}

    def _end(self, lease: _Lease, why: str) -> None:
        lease.open = False
        lease.why = why
