"""CUDA helpers shared by the data plane and the vLLM worker: side streams, page-locking,
multi-tensor copies, and per-thread staging buffers.

Used by :mod:`p2pkv.transport` (pulls into GPU memory) and :mod:`p2pkv.vllm` (saves out of
it); it imports neither. torch is imported inside each helper, so host-only processes that
import this module never load it.

Words: "page-locked" is host memory registered with the CUDA driver (``cudaHostRegister``,
or torch's ``pin_memory``) so that copies to and from the GPU are DMA. (The store's "pin" is
a reference count; see :mod:`p2pkv.store`.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

_local = threading.local()  # per thread: its side streams, one per device


def side_stream(device: Any) -> Any:
    """This thread's copy stream for ``device`` (created once): p2pkv's copies never run on
    the stream vLLM computes on."""
    import torch

    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device)
    return s


def gather_copy(dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
    """``dsts[i].copy_(srcs[i])`` for all i, as one multi-tensor kernel where torch has it,
    on the current stream."""
    import torch

    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and dsts:
        foreach(list(dsts), list(srcs))
    else:
        for d, s in zip(dsts, srcs):
            d.copy_(s, non_blocking=True)


def page_lock(address: int, nbytes: int, read_only: bool = False) -> bool:
    """cudaHostRegister ``nbytes`` at ``address`` so copies to and from the GPU are DMA
    (True when it worked; never raises)."""
    import torch

    flags = 0x08 if read_only else 0  # cudaHostRegisterReadOnly: for a PROT_READ mapping
    try:
        err = torch.cuda.cudart().cudaHostRegister(address, nbytes, flags)
    except Exception:  # noqa: BLE001 - a missing or odd runtime: copies stay synchronous
        return False
    return int(getattr(err, "value", err)) == 0


def page_unlock(address: int) -> None:
    """Undo :func:`page_lock`."""
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)


class StagingPool:
    """Reusable staging buffers, per thread: bytes land here before they are checked and
    copied into their destination.

    Host buffers come in two kinds, each reused and grown on demand: plain (numpy; what
    host-bound UCX receives use) and page-locked (for bytes bound for the GPU: the copy up is
    then one asynchronous DMA; plain where CUDA is not there). Device buffers come from
    torch's caching allocator.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def host(self, nbytes: int, page_locked: bool = False) -> np.ndarray:
        """A host buffer of ``nbytes`` for this thread (valid until its next call)."""
        attr = "page_locked" if page_locked else "plain"
        buf = getattr(self._local, attr, None)
        if buf is None or buf.nbytes < nbytes:
            if page_locked:
                import torch

                t = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                pin_memory=torch.cuda.is_available())
                self._local.page_locked_tensor = t  # keeps the memory alive
                buf = t.numpy()
            else:
                buf = np.empty(max(nbytes, 1), np.uint8)
            setattr(self._local, attr, buf)
        return buf[:nbytes]

    @staticmethod
    def device(nbytes: int, device: Any) -> Any:
        """A fresh device buffer of ``nbytes`` on ``device``."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def drop_host(self) -> None:
        """Forget this thread's plain host buffer (it may be quarantined: a receive that could
        not be cancelled may still write into it)."""
        self._local.plain = None
