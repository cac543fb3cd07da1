"""Host chunk store: a slab of fixed-size slots holding saved chunks, LRU-evicted, pinnable.

The worker side of the connector writes chunks into it after a prefill (``reserve`` →
copy → ``commit``); the transport server reads from it while serving peers (``pin`` →
send → ``unpin``). Both sides run on different threads, so every metadata change happens
under one lock; the bytes of a pinned slot are never rewritten. ("Pin" here is a reference
count: a pinned chunk cannot be evicted. Page-locked memory is another thing: p2pkv.cuda.)

NOTE: a slot's ``generation`` grows each time the slot is handed out again, so a reader that
holds a stale (slot, generation) pair can tell that the bytes are no longer its chunk.

With ``shared=True`` the slab is an (already unlinked) file in /dev/shm that same-host peers
map read-only: the shm transport copies straight out of it while the holder keeps the chunks
pinned.

NOTE (prefault, issue 17): the first write to a slot pays a page fault per page (on the shm
slab, the kernel allocates and zeroes each one), which made a save's copy ~10x slower than
into a slot written before. :meth:`ChunkStore.untouched_ahead` names the free slots that
``reserve`` hands out next and were never touched, and :meth:`ChunkStore.prefault` faults one
in (``p2pkv.pages``); the save thread does it while the worker is idle (``vllm/saver.py``).
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from p2pkv.keys import ChunkKey
from p2pkv.pages import populate

logger = logging.getLogger(__name__)


def digest(views: Sequence[memoryview] | memoryview) -> int:
    """xxh3-64 over the concatenation of ``views``: the digest ``commit`` records with each
    chunk. The holder sends it with the chunk, and the puller hashes what arrived the same
    way (xxh3-64 of the chunk's bytes in slot order, incrementally as they land) and
    compares."""
    h = xxhash.xxh3_64()
    for v in ([views] if isinstance(views, memoryview) else views):
        h.update(v)
    return h.intdigest()


@dataclass(slots=True)
class _Slot:
    index: int
    key: ChunkKey | None = None
    generation: int = 0
    digest: int = 0
    pins: int = 0
    ready: bool = False
    touched: bool = False  # its pages were written or faulted in (never untouched again)


@dataclass(frozen=True, slots=True)
class WritableSlot:
    """A slot reserved for one key; the caller fills ``view`` then commits or aborts it."""

    key: ChunkKey
    index: int
    generation: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class PinnedChunk:
    """A committed chunk that cannot be evicted until unpinned."""

    key: ChunkKey
    index: int
    generation: int
    digest: int
    view: memoryview

    @property
    def views(self) -> tuple[memoryview, ...]:
        """The chunk's bytes as views in slot order (one: a slot; leased reads have several)."""
        return (self.view,)

    @property
    def nbytes(self) -> int:
        return self.view.nbytes


@dataclass(slots=True)
class StoreCounters:
    full: int = 0  # reserves refused: every slot pinned or being written
    served: int = 0  # reads by peers that completed (unpins)


SHM_DIR = "/dev/shm"


def shm_room() -> int:
    """Bytes free in /dev/shm (0 where there is none): a slab bigger than this would fail with
    SIGBUS when touched (e.g. Docker's default 64 MiB /dev/shm), so it must not be created."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class SharedSlab:
    """A tmpfs file mapped read-write that only its open descriptor keeps alive.

    NOTE: the file is unlinked as soon as it is created, so no crash can leak it; same-host
    peers open it as ``/proc/PID/fd/FD`` (same user) and check its (device, inode) identity,
    which the holder sends them, before trusting the mapping.
    """

    def __init__(self, nbytes: int) -> None:
        name = os.path.join(SHM_DIR, f"p2pkv-slab-{os.getpid()}-{secrets.token_hex(8)}")
        self._fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(name)
            os.ftruncate(self._fd, nbytes)  # sparse: pages are allocated as slots are written
            self.map = mmap.mmap(self._fd, nbytes, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        st = os.fstat(self._fd)
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self.ident = f"{st.st_dev}:{st.st_ino}"
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def close(self) -> None:
        """Peers can no longer open the slab; the memory goes with the last mapping."""
        self._finalizer()


class ChunkStore:
    """``capacity`` slots of ``slot_bytes`` each, in one lazily-touched numpy slab (in
    /dev/shm with ``shared=True``; see the module docstring)."""

    def __init__(self, slot_bytes: int, capacity: int, *, shared: bool = False) -> None:
        if slot_bytes <= 0 or capacity <= 0:
            raise ValueError("slot_bytes and capacity must be positive")
        self.slot_bytes = slot_bytes
        self.capacity = capacity
        self._shared = SharedSlab(slot_bytes * capacity) if shared else None
        if self._shared is not None:
            self._slab = np.frombuffer(self._shared.map, dtype=np.uint8).reshape(
                capacity, slot_bytes)
        else:
            # NOTE: np.empty does not touch the pages; memory is committed as slots are used.
            self._slab = np.empty((capacity, slot_bytes), dtype=np.uint8)
        self._slots = [_Slot(i) for i in range(capacity)]
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._lru: OrderedDict[ChunkKey, int] = OrderedDict()  # committed key -> slot index
        self._writing: dict[ChunkKey, int] = {}
        self._evicted: list[ChunkKey] = []
        self._lock = threading.Lock()
        self.counters = StoreCounters()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def holds(self, key: ChunkKey) -> bool:
        """Whether ``key`` is stored or being written (a save is on its way)."""
        with self._lock:
            return key in self._lru or key in self._writing

    @property
    def shm_path(self) -> str:
        """The slab's /dev/shm file, or "" for a private slab."""
        return self._shared.path if self._shared is not None else ""

    @property
    def shm_ident(self) -> str:
        """``device:inode`` of the slab file: what a peer checks after opening ``shm_path``."""
        return self._shared.ident if self._shared is not None else ""

    @property
    def slab_bytes(self) -> int:
        return self.slot_bytes * self.capacity

    def close(self) -> None:
        """Close the shared slab's file (peers that mapped it keep their mapping)."""
        if self._shared is not None:
            self._shared.close()

    def slab_array(self) -> np.ndarray:
        """The whole slab, [capacity, slot_bytes] (for page-locking it)."""
        return self._slab

    def slot_view(self, index: int) -> memoryview:
        return memoryview(self._slab[index]).cast("B")

    def reserve(self, key: ChunkKey) -> WritableSlot | None:
        """A slot to write ``key`` into; None if it is stored already or nothing can be evicted."""
        with self._lock:
            if key in self._lru or key in self._writing:
                return None
            index = self._take_slot()
            if index is None:
                self.counters.full += 1
                return None
            slot = self._slots[index]
            slot.key, slot.ready, slot.digest = key, False, 0
            slot.generation += 1
            slot.touched = True  # the caller writes it now
            self._writing[key] = index
            return WritableSlot(key, index, slot.generation, self.slot_view(index))

    def commit(self, w: WritableSlot) -> None:
        view = self.slot_view(w.index)
        d = digest(view)
        with self._lock:
            slot = self._slots[w.index]
            assert slot.generation == w.generation and slot.key == w.key
            del self._writing[w.key]
            slot.digest, slot.ready = d, True
            self._lru[w.key] = w.index

    def abort(self, w: WritableSlot) -> None:
        with self._lock:
            slot = self._slots[w.index]
            assert slot.generation == w.generation
            del self._writing[w.key]
            slot.key, slot.ready = None, False
            self._free.append(w.index)

    def pin(self, key: ChunkKey) -> PinnedChunk | None:
        """Pin a committed chunk for reading (and mark it recently used); None if absent."""
        with self._lock:
            index = self._lru.get(key)
            if index is None:
                return None
            self._lru.move_to_end(key)
            slot = self._slots[index]
            slot.pins += 1
            return PinnedChunk(key, index, slot.generation, slot.digest, self.slot_view(index))

    def unpin(self, p: PinnedChunk) -> None:
        with self._lock:
            slot = self._slots[p.index]
            assert slot.pins > 0 and slot.generation == p.generation
            slot.pins -= 1
            self.counters.served += 1

    def untouched_ahead(self, limit: int) -> list[int]:
        """Of the next ``limit`` slots ``reserve`` would hand out without evicting, those whose
        pages were never touched (in the order they will be handed out)."""
        with self._lock:
            ahead = self._free[::-1][:limit]
            return [i for i in ahead if not self._slots[i].touched]

    def prefault(self, index: int, piece_bytes: int = 1 << 20,
                 should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Fault in slot ``index``'s pages, ``piece_bytes`` at a time, asking ``should_stop``
        between pieces; returns whether it finished (the slot then counts as touched). Safe
        while another thread writes the slot (bytes already there are kept). Raises
        ``OSError`` where the kernel cannot (``p2pkv.pages.populate``)."""
        row = self._slab[index]
        base = row.ctypes.data
        for off in range(0, self.slot_bytes, piece_bytes):
            if should_stop():
                return False
            populate(base + off, min(piece_bytes, self.slot_bytes - off))
        with self._lock:
            self._slots[index].touched = True
        return True

    def take_evicted(self) -> list[ChunkKey]:
        """Keys evicted since the last call (for publishing removals)."""
        with self._lock:
            out, self._evicted = self._evicted, []
            return out

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, index in self._lru.items():  # oldest first
            if self._slots[index].pins == 0:
                del self._lru[key]
                self._evicted.append(key)
                return index
        return None
