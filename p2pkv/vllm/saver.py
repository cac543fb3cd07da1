"""Saving chunks from a CPU cache off the critical path (the worker's save thread).

After a step's forward pass the worker hands the step's completed chunks to :class:`HostSaver`
and returns at once, so vLLM samples and answers while one thread copies the blocks into
store slots, then commits them (digest) and publishes them. A synchronous copy sat on the
critical path of exactly the request that computed the prefix (measured, issue 17: 22 chunks
of a 2.9k-token prompt, 0.1-0.3 s on a 2-core host, before its first token).

NOTE (ownership): the blocks of a completed chunk are never written again while their request
holds them, but vLLM may hand a freed block (a finished, aborted or preempted request's, freed
at once or later) to a request in any later step, which then zeroes and writes it. So before
a step touches the cache, the connector (``handle_preemptions``, vLLM's first connector call
in every ``execute_model``) calls :meth:`HostSaver.fence` with the blocks the scheduler handed
out for that step (``P2PKVMetadata.new_blocks``): it waits only if a copy still reads one of
them. Otherwise the copies overlap the next step too (a chunked prefill's next part). The
digest and the publish need only the store slot.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, WritableSlot
from p2pkv.vllm.layout import KVLayout

logger = logging.getLogger(__name__)

FENCE_WARN_S = 5.0
"""A fence still waiting after this long is logged (and keeps waiting: letting the next step
overwrite blocks under a running copy would store wrong bytes under a valid key)."""


@dataclass(frozen=True, slots=True)
class _Copy:
    key: ChunkKey
    slot: WritableSlot
    block_ids: tuple[int, ...]


class HostSaver:
    """One thread that copies a step's chunks out of a CPU cache, commits and publishes them
    (``on_saved(keys)``, on that thread, once per step's batch)."""

    def __init__(self, layout: KVLayout, store: ChunkStore,
                 on_saved: Callable[[list[ChunkKey]], None]) -> None:
        assert not layout.on_gpu
        self._layout = layout
        self._store = store
        self._on_saved = on_saved
        self._queue: queue.SimpleQueue[list[_Copy] | None] = queue.SimpleQueue()
        self._copying = 0  # chunks queued whose bytes are not copied out yet
        self._reading: Counter[int] = Counter()  # blocks those copies still read
        self._batches = 0  # batches queued, not published yet
        self._cond = threading.Condition()
        self.copy_s = 0.0  # seconds spent copying (the part a fence may wait for)
        self.fence_waits = 0  # fences that had to wait for a copy
        self._thread = threading.Thread(target=self._loop, name="p2pkv-save", daemon=True)
        self._thread.start()

    def save(self, plans: Sequence[tuple[ChunkKey, Sequence[int]]]) -> int:
        """Queue one step's chunks; returns how many were queued (the others are stored
        already, or the store has no room)."""
        batch = []
        for key, block_ids in plans:
            slot = self._store.reserve(key)
            if slot is not None:
                batch.append(_Copy(key, slot, tuple(block_ids)))
        if batch:
            with self._cond:
                self._copying += len(batch)
                for c in batch:
                    self._reading.update(c.block_ids)
                self._batches += 1
            self._queue.put(batch)
        return len(batch)

    def fence(self, blocks: Collection[int] | None = None) -> bool:
        """Return once no queued copy reads any of ``blocks`` (None: once every queued chunk
        is copied out). Returns whether it had to wait."""
        with self._cond:
            t0 = time.monotonic()
            waited = False
            while self._copying and (blocks is None
                                     or any(b in self._reading for b in blocks)):
                waited = True
                if not self._cond.wait(timeout=FENCE_WARN_S):
                    logger.warning("p2pkv: saves still copying after %.0f s",
                                   time.monotonic() - t0)
            if waited:
                self.fence_waits += 1
            return waited

    def _loop(self) -> None:
        widen_cpu_affinity()
        while (batch := self._queue.get()) is not None:
            saved = []
            for c in batch:
                t0 = time.monotonic()
                try:
                    self._layout.copy_out(c.block_ids, c.slot.view)
                    copied = True
                except Exception:  # noqa: BLE001 - a failed copy must not kill the thread
                    logger.exception("p2pkv: saving a chunk failed")
                    self._store.abort(c.slot)
                    copied = False
                with self._cond:
                    self.copy_s += time.monotonic() - t0
                    self._copying -= 1
                    self._reading.subtract(c.block_ids)
                    self._reading = +self._reading  # drops blocks no copy reads
                    self._cond.notify_all()
                if copied:
                    self._store.commit(c.slot)  # the digest: no longer reads the cache
                    saved.append(c.key)
            try:
                self._on_saved(saved)
            except Exception:  # noqa: BLE001
                logger.exception("p2pkv: publishing saved chunks failed")
            with self._cond:
                self._batches -= 1
                self._cond.notify_all()

    def wait_saved(self, timeout_s: float) -> bool:
        """Wait until every queued chunk is committed and published; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._batches:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
            return True

    def close(self) -> None:
        """Finish the queued saves and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)
