"""Which bytes of vLLM's paged KV cache form a chunk, and how they sit in a store slot.

vLLM (0.32) hands the worker one tensor per attention layer whose logical shape is
``[num_blocks, H, N, C]`` (RFC #42082); the attention backend's physical layout is a stride
permutation of it. Only the block dimension matters here: block ``b`` of a layer is the set
of bytes of ``t[b]``, which in memory is one or more dense byte ranges ("segments"):

- CPU (``LBHNC``, ``[blocks, kv_heads, block_size, 2*head_size]`` contiguous): one segment;
- GPU FlashAttention / FlashInfer with the blocks outermost (``LBNHC`` = NHD, ``LBHNC`` = HND,
  K‖V per token and head in ``C``): one segment per block, whatever the inner order;
- layouts with heads outside blocks (``LHBNC``): one segment per head.

A chunk of ``chunk_blocks`` blocks is stored block-major, then layer, then segment::

    slot = [block 0: layer 0 (segments) | layer 1 | ... ][block 1: layer 0 | ...] ...

Bytes are copied as they lie in memory, so instances must agree on the physical layout, not
only the shape: :attr:`KVLayout.signature` names it, and goes into the hash probe that the
directory compares between members of a namespace.

The pieces are ``memoryview`` for a CPU cache and 1-D uint8 CUDA tensors for a GPU cache, or
one :class:`DeviceBlocks` per chunk (the transport's destination pieces:
``transport.base.Piece``). Saving from a GPU cache is an asynchronous device-to-host copy
(:mod:`p2pkv.vllm.gpu`); the CUDA helpers both use live in :mod:`p2pkv.cuda`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pkv.cuda import gather_copy, side_stream
from p2pkv.errors import ConfigError
from p2pkv.transport.base import DeviceChunk, Piece


def block_segments(shape: Sequence[int], strides: Sequence[int], itemsize: int
                   ) -> tuple[tuple[int, int], ...]:
    """The dense byte ranges ``(offset, length)`` covering one block, in memory order.

    ``shape``/``strides`` (in elements) describe one block (the tensor without its block
    dimension). Dimensions are ordered by stride, the longest dense tail is one segment, and
    the outer dimensions enumerate the segments.
    """
    dims = sorted(((st, n) for n, st in zip(shape, strides) if n != 1), reverse=True)
    if any(st <= 0 for st, _ in dims):
        raise ConfigError(f"p2pkv: unsupported KV strides {tuple(strides)}")
    inner = 1  # elements in the dense tail
    k = len(dims)
    while k > 0 and dims[k - 1][0] == inner:
        inner *= dims[k - 1][1]
        k -= 1
    outer = dims[:k]
    segments = []
    for index in np.ndindex(*(n for _, n in outer)) if outer else [()]:
        off = sum(i * st for i, (st, _) in zip(index, outer))
        segments.append((off * itemsize, inner * itemsize))
    ranges = sorted(segments)
    if any(a[0] + a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise ConfigError(f"p2pkv: overlapping KV strides {tuple(strides)}")
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Byte ranges of every layer's blocks, in the model's layer order."""

    layer_names: tuple[str, ...]
    bases: tuple[Any, ...]  # per layer: 1-D uint8 tensor over the layer's storage
    first: tuple[int, ...]  # per layer: byte offset of block 0 in its base
    block_stride: int  # bytes between consecutive blocks of a layer
    segments: tuple[tuple[int, int], ...]  # (offset in block, length): same for every layer
    num_blocks: int
    device: str  # "cpu" or "cuda:N"
    signature: str  # dtype, shape and stride order: equal layouts copy exactly
    # one dense segment per block: per layer a [num_blocks, block_bytes] uint8 view (numpy on
    # CPU, torch on GPU) of the cache, for whole-chunk copies
    rows: tuple[Any, ...] = ()

    @classmethod
    def from_kv_caches(cls, kv_caches: Mapping[str, Any]) -> KVLayout:
        import torch

        names, bases, first = [], [], []
        ref: tuple | None = None
        for name, t in kv_caches.items():
            assert isinstance(t, torch.Tensor)
            if t.device.type not in ("cpu", "cuda"):
                raise ConfigError(f"p2pkv: KV cache on {t.device.type} is not supported")
            es = t.element_size()
            this = (tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
            if ref not in (None, this):
                raise ConfigError("p2pkv: layers with different KV shapes/layouts are not "
                                  f"supported ({ref} vs {this})")
            ref = this
            base = torch.empty(0, dtype=torch.uint8, device=t.device)
            base.set_(t.untyped_storage())
            names.append(name)
            bases.append(base)
            first.append(t.storage_offset() * es)
        if ref is None:
            raise ConfigError("p2pkv: no KV cache layers registered")
        shape, strides, dtype, device = ref
        es = torch.empty(0, dtype=dtype).element_size()
        segments = block_segments(shape[1:], strides[1:], es)
        order = "".join(str(i) for i in sorted(range(len(shape)), key=lambda d: -strides[d]))
        signature = f"{str(dtype).removeprefix('torch.')}/{'x'.join(map(str, shape[1:]))}/" \
                    f"order{order}/seg{len(segments)}"
        rows: tuple[Any, ...] = ()
        if len(segments) == 1 and segments[0][0] == 0:
            bb = segments[0][1]
            if device == "cpu":
                rows = tuple(np.lib.stride_tricks.as_strided(
                    b.numpy()[f:], shape=(shape[0], bb), strides=(strides[0] * es, 1))
                    for b, f in zip(bases, first))
            else:
                rows = tuple(b.as_strided((shape[0], bb), (strides[0] * es, 1), f)
                             for b, f in zip(bases, first))
        return cls(tuple(names), tuple(bases), tuple(first), strides[0] * es, segments,
                   int(shape[0]), device, signature, rows)

    @property
    def num_layers(self) -> int:
        return len(self.bases)

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer."""
        return sum(n for _, n in self.segments)

    def chunk_bytes(self, chunk_blocks: int) -> int:
        return chunk_blocks * self.num_layers * self.block_bytes

    def block_views(self, block_id: int) -> list[Any]:
        """The destination pieces of one block, in slot order (layer, then segment)."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range")
        if self.rows and not self.on_gpu:
            return [memoryview(r[block_id]) for r in self.rows]
        out = []
        for base, first in zip(self.bases, self.first):
            at = first + block_id * self.block_stride
            for off, n in self.segments:
                piece = base[at + off:at + off + n]
                out.append(piece if self.on_gpu else memoryview(piece.numpy()))
        return out

    def chunk_dest(self, block_ids: Sequence[int | None]) -> tuple[Piece, ...]:
        """Where a pulled chunk goes: the pieces of its blocks (a ``None`` block: scratch that
        is dropped), or on a GPU with one segment per block, one :class:`DeviceBlocks`."""
        if self.on_gpu and self.rows:
            return (DeviceBlocks(self, block_ids),)
        pieces: list[Piece] = []
        for b in block_ids:
            if b is not None:
                pieces.extend(self.block_views(b))
            elif self.on_gpu:
                import torch

                pieces.append(torch.empty(self.block_bytes * self.num_layers,
                                          dtype=torch.uint8, device=self.device))
            else:
                pieces.append(memoryview(bytearray(self.block_bytes * self.num_layers)))
        return tuple(pieces)

    def gather_into(self, block_ids: Sequence[int], dst: Any) -> None:
        """Copy the chunk made of ``block_ids`` from a GPU cache into ``dst`` (a uint8 device
        tensor, slot order), on the current stream: one indexed copy per layer, or one
        multi-tensor copy of the pieces for layouts with several segments per block."""
        assert self.on_gpu
        if self.rows:
            DeviceBlocks(self, block_ids).read_into(dst)
            return
        pieces = [p for b in block_ids for p in self.block_views(b)]
        parts, off = [], 0
        for p in pieces:
            parts.append(dst[off:off + p.nbytes])
            off += p.nbytes
        gather_copy(parts, pieces)

    def copy_out(self, block_ids: Sequence[int], slot: memoryview) -> None:
        """Copy the chunk made of ``block_ids`` from a CPU cache into a store slot."""
        assert not self.on_gpu, "GPU caches are saved with gpu.AsyncSaver"
        dst = np.frombuffer(slot, dtype=np.uint8)
        off = 0
        for b in block_ids:
            for piece in ([r[b] for r in self.rows] if self.rows and not self.on_gpu
                          else [np.frombuffer(v, np.uint8) for v in self.block_views(b)]):
                dst[off:off + piece.nbytes] = piece
                off += piece.nbytes
        assert off <= dst.nbytes


class DeviceBlocks(DeviceChunk):
    """One chunk's blocks in a GPU cache with one segment per block, copied as a whole: one
    indexed copy per layer instead of a copy per (block, layer) piece (a 16-block chunk of a
    32-layer model is 512 pieces; slicing them alone cost milliseconds). The transport calls
    ``write_from`` (``transport/land.py``); ``KVLayout.gather_into`` (the GPU saves) calls
    ``read_into``. A ``None`` block id is a block computed locally: its
    bytes are dropped."""

    def __init__(self, layout: KVLayout, block_ids: Sequence[int | None]) -> None:
        import torch

        assert layout.rows and isinstance(layout.rows[0], torch.Tensor)
        self._rows = layout.rows
        self._blocks = len(block_ids)
        self._bb = layout.block_bytes
        self.device = layout.rows[0].device
        self.nbytes = self._blocks * layout.num_layers * self._bb
        keep = [i for i, b in enumerate(block_ids) if b is not None]
        self._all = len(keep) == len(block_ids)
        pos = torch.tensor(keep, dtype=torch.long)
        ids = torch.tensor([block_ids[i] for i in keep], dtype=torch.long)
        if self.device.type == "cuda":
            # NOTE: on p2pkv's side stream, never the default stream vLLM may compute on
            with torch.cuda.stream(side_stream(self.device)):
                pos, ids = pos.to(self.device), ids.to(self.device)
        self._pos, self._ids = pos, ids

    def _view(self, flat: Any) -> Any:
        return flat.view(self._blocks, len(self._rows), self._bb)

    def write_from(self, src: Any) -> None:
        """Copy a chunk (a uint8 device tensor, slot order) into the blocks, on the current
        stream."""
        s3 = self._view(src)
        if not self._all:
            s3 = s3.index_select(0, self._pos)
        for layer, rows in enumerate(self._rows):
            rows.index_copy_(0, self._ids, s3[:, layer])

    def read_into(self, dst: Any) -> None:
        """Copy the blocks into a chunk buffer (a uint8 device tensor), on the current
        stream."""
        assert self._all
        d3 = self._view(dst)
        for layer, rows in enumerate(self._rows):
            d3[:, layer].copy_(rows.index_select(0, self._ids))
