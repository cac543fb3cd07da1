"""Serving finished requests' chunks straight from vLLM's paged blocks (issue 14, tier 1).

One worker rank's lender: the data-plane server asks it for keys its store does not hold
(``transport/leased.py``). The scheduler side grants a lease on a finished request's chunks
(``LeaseGrant`` in the step's metadata) and vLLM keeps the blocks (``delay_free``) until this
rank hands the request back (``take_released`` → ``finished_sending``). The
:class:`~p2pkv.vllm.lease.LeaseTable` decides when: the lease expired, every chunk was pulled
``max_pulls`` times, or the scheduler side ended it (memory pressure), and no read is still
out. A chunk's keys are published when its lease is granted, as leased for its ttl (the
directory's lookups name the tier, ``Holder.tier``; keys the store holds already stay stored).
When the lease ends its chunks are copied into the store, the durable tier (the save thread's
copy, fenced like every save before vLLM reuses the blocks), and published again, as stored;
the keys the store could not take are unpublished.

NOTE (stale check): a read pins its lease, and a lease is handed back only with no pins out,
so vLLM cannot reuse a block under a read. On top of that the first read of a chunk records
its digest and every later read's digest must match it, else the read is refused (MISSING)
and counted in ``lease_stale``: bytes that changed under a lease are never served as the chunk.
CPU caches only (the blocks are host memory, served in place as memoryviews).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, digest
from p2pkv.transport.leased import LeasedRead
from p2pkv.vllm.lease import LeasePin, LeaseTable
from p2pkv.vllm.layout import KVLayout
from p2pkv.vllm.metadata import LeaseGrant, P2PKVMetadata

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LeaseCounters:
    leases_granted: int = 0
    leases_released: int = 0
    chunks_served_leased: int = 0  # reads served in place from leased blocks
    chunks_leased_to_store: int = 0  # copied into the store for a same-host / UCX pull
    chunks_moved_to_store: int = 0  # copies queued into the store as leases ended
    lease_stale: int = 0  # reads refused: the bytes differed from the chunk's first read


class LeasedBlocks:
    """``transport.leased.LeasedChunks`` over one rank's CPU cache. ``publish(added,
    removed, lease_s=...)``: tell the directory (``DirectoryClient.publish``);
    ``save(plans)``: queue copies into the store (the save thread, ``HostSaver.save``)."""

    def __init__(self, layout: KVLayout, store: ChunkStore,
                 publish: Callable[..., None],
                 save: Callable[[Sequence[tuple[ChunkKey, Sequence[int]]]], int], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_ready: Callable[[], None] | None = None) -> None:
        """``on_ready()``: a lease ended by its reads (pulled ``max_pulls`` times, or its last
        read after it ended) can be handed back now, before any step asks: the worker wakes
        the EngineCore's idle wait (``p2pkv.vllm.idlewait``). Called on a server thread."""
        assert not layout.on_gpu, "leases serve host blocks in place (CPU caches)"
        self._layout = layout
        self._store = store
        self._publish = publish
        self._save = save
        self._table = LeaseTable(clock=clock)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # a lease may be handed back
        self._grants: dict[str, LeaseGrant] = {}
        self._first: dict[tuple[str, ChunkKey], int] = {}  # first read's digest
        self._reads: dict[str, Counter[ChunkKey]] = {}
        self.counters = LeaseCounters()

    # -- the step thread ------------------------------------------------------------------

    def apply(self, meta: P2PKVMetadata) -> None:
        """This step's grants and early ends."""
        for g in meta.grants:
            chunks = [(c.key, c.block_ids) for c in g.chunks]
            with self._lock:
                self._grants[g.req_id] = g
                self._reads[g.req_id] = Counter()
            if self._table.grant(g.req_id, chunks, g.ttl_s):
                fresh = [c.key for c in g.chunks if not self._store.holds(c.key)]
                if fresh:
                    self._publish(fresh, [], lease_s=g.ttl_s)
                with self._lock:
                    self.counters.leases_granted += 1
                logger.info("p2pkv: lease on %s: %d chunks for %.1f s", g.req_id,
                            len(chunks), g.ttl_s)
        for req_id in meta.end_leases:
            self._table.end(req_id, "memory pressure")

    def take_released(self, wait_s: float = 0.0) -> set[str]:
        """Requests whose blocks vLLM may free now; their chunks are queued into the store
        first. ``wait_s``: with leases out and none to hand back, wait that long for one."""
        out = self._table.take_released()
        if not out and wait_s > 0 and self._table.open_leases():
            with self._lock:
                self._ended.wait(wait_s)
            out = self._table.take_released()
        for req_id in out:
            with self._lock:
                g = self._grants.pop(req_id, None)
                self._reads.pop(req_id, None)
                for key in [k for k in self._first if k[0] == req_id]:
                    del self._first[key]
                self.counters.leases_released += 1
            if g is None:
                continue
            need = [(c.key, c.block_ids) for c in g.chunks if not self._store.holds(c.key)]
            queued = self._save(need) if need else 0
            lost = [k for k, _ in need if not self._store.holds(k) and not self._table.leases(k)]
            with self._lock:
                self.counters.chunks_moved_to_store += queued
            if lost:
                self._publish([], lost)
            logger.debug("p2pkv: lease on %s ended: %d chunks to the store, %d dropped",
                         req_id, queued, len(lost))
        return out

    def open_leases(self) -> int:
        return self._table.open_leases()

    # -- the server's threads (transport.leased.LeasedChunks) ----------------------------

    def pin(self, key: ChunkKey) -> LeasedRead | None:
        lp = self._table.pin(key)
        if lp is None:
            return None
        views = self._layout.chunk_dest(lp.block_ids)
        d = digest(views)  # type: ignore[arg-type]
        with self._lock:
            first = self._first.setdefault((lp.req_id, key), d)
        if first != d:
            self._unpin(lp)
            with self._lock:
                self.counters.lease_stale += 1
            logger.error("p2pkv: leased chunk of %s changed under its lease: not served",
                         lp.req_id)
            return None
        return LeasedRead(key, views, sum(v.nbytes for v in views), d, lp)  # type: ignore[union-attr]

    def unpin(self, read: LeasedRead) -> None:
        lp = read.token
        assert isinstance(lp, LeasePin)
        self._count(lp)
        with self._lock:
            self.counters.chunks_served_leased += 1
        self._unpin(lp)

    def _count(self, lp: LeasePin) -> None:
        """One more pull of ``lp``'s chunk; a lease whose chunks were all pulled
        ``max_pulls`` times ends (takes no new reads)."""
        with self._lock:
            reads = self._reads.get(lp.req_id)
            g = self._grants.get(lp.req_id)
            done = False
            if reads is not None and g is not None and g.max_pulls:
                reads[lp.key] += 1
                done = all(reads[c.key] >= g.max_pulls for c in g.chunks)
        if done:
            self._table.end(lp.req_id, "pulled")

    def to_store(self, key: ChunkKey) -> bool:
        if key in self._store:
            return True
        read = self.pin(key)
        if read is None:
            return False
        try:
            slot = self._store.reserve(key)
            if slot is None:
                return key in self._store
            dst = np.frombuffer(slot.view, dtype=np.uint8)
            off = 0
            for v in read.views:
                dst[off:off + v.nbytes] = np.frombuffer(v, dtype=np.uint8)
                off += v.nbytes
            self._store.commit(slot)
            self._count(read.token)  # type: ignore[arg-type]
            with self._lock:
                self.counters.chunks_leased_to_store += 1
            return True
        finally:
            self._unpin(read.token)  # type: ignore[arg-type]

    def _unpin(self, lp: LeasePin) -> None:
        ready = self._table.unpin(lp)
        with self._lock:
            self._ended.notify_all()
        if ready and self._on_ready is not None:
            self._on_ready()
