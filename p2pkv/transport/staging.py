"""Destination pieces of a pull: host memory (``memoryview``) or CUDA memory (a 1-D uint8
``torch.Tensor`` on a CUDA device), and the copies out of a contiguous staging buffer.

A chunk arrives contiguous (as the holder's store slot holds it) and is scattered into the
pieces of vLLM's paged cache. Device copies run on one side stream per thread (never vLLM's
compute stream) and are waited for before the pull reports success. torch is imported only
when a device piece shows up, so host-only processes never load it here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_local = threading.local()


def is_device(piece: Any) -> bool:
    """Anything but a memoryview: a CUDA tensor, or an object with ``nbytes``, ``device`` and
    ``write_from(device_tensor)`` that places a whole chunk itself (``DeviceBlocks``)."""
    return not isinstance(piece, memoryview)


def host_pieces(pieces: Sequence[Any]) -> bool:
    return all(isinstance(p, memoryview) for p in pieces)


def side_stream(device: Any) -> Any:
    """This thread's copy stream for ``device`` (created once)."""
    import torch

    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device)
    return s


def scatter(src: Any, pieces: Sequence[Any], verify: Callable[[], bool] | None = None
            ) -> bool:
    """Copy ``src`` (a numpy uint8 array or a CUDA uint8 tensor) into ``pieces`` in order,
    unless ``verify()`` says no; device copies are complete when this returns.

    Device pieces are filled from a device copy of ``src`` (one host-to-device copy when it is
    in host memory) with one multi-tensor copy: a chunk is hundreds of pieces, and a kernel
    launch per piece would cost more than moving the bytes. ``verify`` (the digest check)
    runs while that host-to-device copy is in flight, and no piece is written before it
    passed.
    """
    total = sum(p.nbytes for p in pieces)
    assert total == src.shape[0], f"scattering {src.shape[0]} bytes into {total}"
    if host_pieces(pieces):
        if verify is not None and not verify():
            return False
        if not isinstance(src, np.ndarray):
            src = src.cpu().numpy()
        off = 0
        for p in pieces:
            np.copyto(np.frombuffer(p, np.uint8), src[off:off + p.nbytes])
            off += p.nbytes
        return True
    import torch

    device = next(p.device for p in pieces if is_device(p))
    stream = side_stream(device)
    with torch.cuda.stream(stream):
        if isinstance(src, np.ndarray):
            with warnings.catch_warnings():  # a read-only mapping: torch only reads it here
                warnings.simplefilter("ignore", UserWarning)
                host = torch.from_numpy(src)
            src = host.to(device, non_blocking=True)
        elif src.device != device:
            src = src.to(device, non_blocking=True)
    if verify is not None and not verify():
        stream.synchronize()  # the upload still reads ``src``: let it finish
        return False
    with torch.cuda.stream(stream):
        if len(pieces) == 1 and hasattr(pieces[0], "write_from"):
            pieces[0].write_from(src)
            pieces = []
        dsts, srcs, off = [], [], 0
        for p in pieces:
            part = src[off:off + p.nbytes]
            off += p.nbytes
            if isinstance(p, memoryview):
                np.copyto(np.frombuffer(p, np.uint8), part.cpu().numpy())
            else:
                dsts.append(p)
                srcs.append(part)
        gather_copy(dsts, srcs)
    stream.synchronize()
    return True


def gather_copy(dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
    """``dsts[i].copy_(srcs[i])`` for all i, as one multi-tensor kernel where torch has it."""
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
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)


def pinned_host(nbytes: int) -> np.ndarray:
    """A page-locked host buffer when CUDA is there (async host-to-device copies), else a
    plain one. Per thread, reused, grown on demand."""
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.nbytes < nbytes:
        import torch

        t = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                        pin_memory=torch.cuda.is_available())
        _local.pinned_tensor = t  # keeps the memory alive
        buf = _local.pinned = t.numpy()
    return buf[:nbytes]
