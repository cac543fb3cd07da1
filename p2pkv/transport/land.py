"""How a pulled chunk lands in its destination pieces: one contiguous buffer (as the holder's
store slot holds it) scattered into the pieces of vLLM's paged cache.

Used by every path (``stream.py``, ``shm.py``, ``ucx.py``). Device copies run on p2pkv's side
stream of this thread (:func:`p2pkv.cuda.side_stream`, never vLLM's compute stream) and are
finished before :func:`scatter` returns. torch is imported only when a device piece shows up,
so host-only processes never load it here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from p2pkv.cuda import gather_copy, side_stream
from p2pkv.transport.base import DeviceChunk, Piece, host_pieces, is_device


def scatter(src: Any, pieces: Sequence[Piece], verify: Callable[[], bool] | None = None
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
        if len(pieces) == 1 and isinstance(pieces[0], DeviceChunk):
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
