"""The GPU end of the worker: page-locking the store and saving chunks from CUDA blocks.

Saves never block the forward pass: after the step's kernels are queued, the copies of its
completed chunks (one gather kernel into a device buffer, one device-to-host DMA per chunk)
are queued on a side stream that first waits for the compute
stream (GPU-side, the CPU does not wait). A chunk is committed to the store, and published,
only once its copy event has completed (published at the next step). Until then the next step's
compute stream waits for the copy event before it runs (again GPU-side only, and by then the
copy is normally long done), so vLLM cannot overwrite blocks that are still being copied out.
A committer thread waits for each copy and commits the slot (computing its digest), so the
worker's main thread spends only the queueing on a save.

The store's slab is page-locked with ``cudaHostRegister`` so that the copies are real
asynchronous DMA (and the TCP path's host-to-device copies too).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.cuda import page_lock, page_unlock
from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, WritableSlot
from p2pkv.vllm.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    key: ChunkKey
    slot: WritableSlot
    event: Any
    staging: Any  # the device buffer the chunk was gathered into (alive until copied out)


class AsyncSaver:
    """Queues device-to-host copies of chunks into store slots; a committer thread commits
    each one (digest included) once its copy is done, off the step's critical path."""

    def __init__(self, layout: KVLayout, store: ChunkStore) -> None:
        import torch

        assert layout.on_gpu
        self._layout = layout
        self._store = store
        self._device = torch.device(layout.device)
        self._stream = torch.cuda.Stream(self._device)
        self._lock = threading.Lock()
        self._inflight: list[_Pending] = []  # queued, not committed yet (fence waits on them)
        self._done: list[ChunkKey] = []  # committed, not collected yet
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._slab = store.slab_array()
        self.page_locked = page_lock(self._slab.ctypes.data, self._slab.nbytes)
        if not self.page_locked:
            logger.warning("p2pkv: could not page-lock the store; saves from the GPU are "
                           "synchronous copies")
        self._thread = threading.Thread(target=self._commit_loop, name="p2pkv-save-commit",
                                        daemon=True)
        self._thread.start()

    def save(self, key: ChunkKey, block_ids: Sequence[int]) -> bool:
        """Queue the copy of one chunk; False when the store had no room (or has it).

        On the side stream, after the compute stream's work so far: one multi-tensor kernel
        gathers the chunk's pieces into a device buffer, one DMA copies it into the slot.
        """
        import torch

        slot = self._store.reserve(key)
        if slot is None:
            return False
        dst = torch.from_numpy(np.frombuffer(slot.view, np.uint8))
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            n = len(block_ids) * self._layout.num_layers * self._layout.block_bytes
            staging = torch.empty(n, dtype=torch.uint8, device=self._device)
            self._layout.gather_into(block_ids, staging)
            dst[:n].copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        pending = _Pending(key, slot, event, staging)
        with self._lock:
            self._inflight.append(pending)
        self._queue.put(pending)
        return True

    def _commit_loop(self) -> None:
        widen_cpu_affinity()
        while (p := self._queue.get()) is not None:
            try:
                p.event.synchronize()  # releases the GIL while it waits
                self._store.commit(p.slot)  # the digest is computed here
                done = True
            except Exception:  # noqa: BLE001 - a failed copy must not kill the thread
                logger.exception("p2pkv: saving a chunk from the GPU failed")
                self._store.abort(p.slot)
                done = False
            with self._lock:
                self._inflight.remove(p)
                if done:
                    self._done.append(p.key)

    def fence(self) -> None:
        """Make the compute stream wait for the copies still in flight (GPU-side only)."""
        import torch

        compute = torch.cuda.current_stream(self._device)
        with self._lock:
            events = [p.event for p in self._inflight]
        for e in events:
            compute.wait_event(e)

    def collect(self, wait: bool = False) -> list[ChunkKey]:
        """The keys committed since the last call (``wait``: after every queued copy)."""
        if wait:
            while True:
                with self._lock:
                    if not self._inflight:
                        break
                time.sleep(0.001)
        with self._lock:
            out, self._done = self._done, []
        return out

    def close(self) -> None:
        """Finish the copies in flight, stop the committer, unlock the slab (before the
        store goes)."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self.page_locked:
            page_unlock(self._slab.ctypes.data)
            self.page_locked = False
