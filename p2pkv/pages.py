"""Faulting in a buffer's pages before it is written (the store's prefault, issue 17).

The store's slab is touched lazily (``store.py``): the first write to each 4 KiB page of a slot
takes a page fault, and on the /dev/shm slab that same-host peers map (tmpfs) every fault
allocates and zeroes a page in the kernel. Measured (``p2pkv bench save``): copying a
SmolLM2-135M chunk (5.9 MB) into a never-touched shm slot took ~10x as long as into a slot
touched before. ``MADV_POPULATE_WRITE`` (Linux 5.14) faults a range in with one system call, so
the save thread can do it for the slots it will write next while the worker is idle
(``vllm/saver.py``), and the copy itself then only moves bytes. It never changes the bytes of
a page already there, so it is safe on a slot another thread writes.
"""

from __future__ import annotations

import ctypes
import mmap
import os

MADV_POPULATE_WRITE = 23  # linux/mman.h (not in Python 3.11's mmap module)

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def populate(address: int, nbytes: int) -> None:
    """Fault in, writable, the whole pages inside ``[address, address + nbytes)`` (the partial
    pages at either end are left as they are). Raises ``OSError`` where the kernel cannot
    (older than 5.14: EINVAL; no memory left: ENOMEM)."""
    start = -(-address // PAGE) * PAGE
    end = (address + nbytes) // PAGE * PAGE
    if end <= start:
        return
    if _madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_POPULATE_WRITE): {os.strerror(err)}")
