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
them. The digest and the publish need only the store slot.

NOTE (issue 17, the forward gate): a copy never runs while this worker's forward pass does,
if it can wait. On a CPU cache the forward's OpenMP threads take every core, and a save
thread beside them stalls a whole parallel region whenever it preempts one of its threads
(and takes the GIL between copies). A 3,000-token cold miss is prefilled in two steps (vLLM's
2,048-token budget on CPU): the first step's 16 chunks were copied during the second step. The worker marks each forward pass
(:meth:`HostSaver.forward_begins` before the step touches the cache, :meth:`forward_ends`
in ``wait_for_save``); the save thread copies between passes, and a chunk waits for at most
one whole pass after it was queued (so, a step later at most, it is published) and at most
``MAX_DEFER_S``. A fence never waits behind the gate: it runs before its step's pass begins.

NOTE (issue 17, prefault): a store slot's first write page-faults every page (on the shm slab
the kernel allocates and zeroes each: ~90 % of a copy into a fresh slot, ``p2pkv bench
save``). While nothing is queued and no forward pass runs, the save thread faults in the next
``PREFAULT_AHEAD_BYTES`` of never-touched free slots (``ChunkStore.prefault``), a MiB at a
time, stopping as soon as a pass begins or a batch arrives; so the copies of a cold miss
mostly land in slots faulted in while the instance was idle. It commits that much of the
store's memory ahead of its use.
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

MAX_DEFER_S = 5.0
"""Longest a queued chunk waits for a forward pass to end (a safety bound: a chunk waits for
one pass at most, and passes are bounded by vLLM's token budget)."""

PREFAULT_AHEAD_BYTES = 256 << 20
"""How much of the store, in never-touched free slots, the save thread faults in ahead."""

IDLE_RECHECK_S = 1.0
"""Longest the save thread sleeps between looks at the gate while it has prefaulting left
(forward_ends and save wake it at once; this bounds a missed wake-up)."""

FENCE_WARN_S = 5.0
"""A fence still waiting after this long is logged (and keeps waiting: letting the next step
overwrite blocks under a running copy would store wrong bytes under a valid key)."""


@dataclass(frozen=True, slots=True)
class _Copy:
    key: ChunkKey
    slot: WritableSlot
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Batch:
    copies: list[_Copy]
    queued: float  # time.monotonic() at save()
    passes_ended: int  # forward passes ended when it was queued


class HostSaver:
    """One thread that copies a step's chunks out of a CPU cache, commits and publishes them
    (``on_saved(keys)``, on that thread, once per step's batch)."""

    def __init__(self, layout: KVLayout, store: ChunkStore,
                 on_saved: Callable[[list[ChunkKey]], None]) -> None:
        assert not layout.on_gpu
        self._layout = layout
        self._store = store
        self._on_saved = on_saved
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._copying = 0  # chunks queued whose bytes are not copied out yet
        self._reading: Counter[int] = Counter()  # blocks those copies still read
        self._batches = 0  # batches queued, not published yet
        self._cond = threading.Condition()
        self._in_forward = False  # a forward pass of this worker runs (the gate is shut)
        self._passes_ended = 0
        self.copy_s = 0.0  # seconds spent copying (the part a fence may wait for)
        self.copy_in_forward_s = 0.0  # of which while a forward pass ran (the gate gave way)
        self.fence_waits = 0  # fences that had to wait for a copy
        self.fence_wait_s = 0.0  # how long they waited (the step's critical path)
        self.prefaulted = 0  # slots faulted in ahead of their first write
        self.prefault_s = 0.0  # seconds spent doing it (while idle)
        self._ahead = max(1, PREFAULT_AHEAD_BYTES // store.slot_bytes)
        self._prefault = True  # there may be slots to fault in (rechecked after each batch)
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
                self._queue.put(_Batch(batch, time.monotonic(), self._passes_ended))
                self._cond.notify_all()  # a prefault in progress stops
        return len(batch)

    def forward_begins(self) -> None:
        """A forward pass starts: copies wait (see the module's note on the gate)."""
        with self._cond:
            self._in_forward = True

    def forward_ends(self) -> None:
        """The forward pass ended: copies run."""
        with self._cond:
            if self._in_forward:
                self._in_forward = False
                self._passes_ended += 1
                self._cond.notify_all()

    def _wait_for_gate(self, batch: _Batch) -> bool:
        """Until no forward pass runs, or the batch waited for a whole pass or MAX_DEFER_S;
        returns whether a pass is running now (the copy then overlaps it)."""
        with self._cond:
            deadline = batch.queued + MAX_DEFER_S
            while self._in_forward and self._passes_ended <= batch.passes_ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            return self._in_forward

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
                self.fence_wait_s += time.monotonic() - t0
            return waited

    def _next_batch(self) -> _Batch | None:
        """The next queued batch (None: close); while none is queued, prefault slots whenever
        no forward pass runs."""
        while self._prefault:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            with self._cond:
                if self._in_forward:
                    self._cond.wait(timeout=IDLE_RECHECK_S)
                    continue
            self._prefault_one()
        return self._queue.get()

    def _prefault_one(self) -> None:
        """Fault in the next never-touched free slot, or note that there is none."""
        ahead = self._store.untouched_ahead(self._ahead)
        if not ahead:
            self._prefault = False
            return
        t0 = time.monotonic()
        try:
            done = self._store.prefault(
                ahead[0], should_stop=lambda: self._in_forward or not self._queue.empty())
        except OSError as e:  # an older kernel, or no memory: saves touch slots as they write
            logger.info("p2pkv: store slots are not faulted in ahead (%s)", e)
            self._prefault = False
            self._ahead = 0
            return
        self.prefault_s += time.monotonic() - t0
        self.prefaulted += done

    def _loop(self) -> None:
        widen_cpu_affinity()
        while (batch := self._next_batch()) is not None:
            saved = []
            for c in batch.copies:
                overlaps = self._wait_for_gate(batch)
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
                    if overlaps:
                        self.copy_in_forward_s += time.monotonic() - t0
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
                self._prefault = self._ahead > 0
                self._cond.notify_all()

    def wait_saved(self, timeout_s: float) -> bool:
        """Wait until every queued chunk is committed and published; False on timeout. The
        caller runs no forward pass meanwhile (shutdown, tests): the gate opens."""
        self.forward_ends()
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
        with self._cond:
            self._queue.put(None)
            self._cond.notify_all()
        self._thread.join(timeout=30)
