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

The pieces are ``memoryview`` for a CPU cache and 1-D uint8 CUDA tensors for a GPU cache (the
transports accept both; :mod:`p2pkv.transport.staging`). Saving from a GPU cache is an
asynchronous device-to-host copy (:mod:`p2pkv.vllm.gpu`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pkv.errors import ConfigError


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
    rows: tuple[np.ndarray, ...] = ()  # CPU only: per layer uint8 [num_blocks, block_stride]

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
        rows: tuple[np.ndarray, ...] = ()
        if device == "cpu" and len(segments) == 1 and segments[0][0] == 0:
            bb = segments[0][1]
            rows = tuple(np.lib.stride_tricks.as_strided(
                b.numpy()[f:], shape=(shape[0], bb), strides=(strides[0] * es, 1))
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
        if self.rows:
            return [memoryview(r[block_id]) for r in self.rows]
        out = []
        for base, first in zip(self.bases, self.first):
            at = first + block_id * self.block_stride
            for off, n in self.segments:
                piece = base[at + off:at + off + n]
                out.append(piece if self.on_gpu else memoryview(piece.numpy()))
        return out

    def copy_out(self, block_ids: Sequence[int], slot: memoryview) -> None:
        """Copy the chunk made of ``block_ids`` from a CPU cache into a store slot."""
        assert not self.on_gpu, "GPU caches are saved with gpu.AsyncSaver"
        dst = np.frombuffer(slot, dtype=np.uint8)
        off = 0
        for b in block_ids:
            for piece in ([r[b] for r in self.rows] if self.rows
                          else [np.frombuffer(v, np.uint8) for v in self.block_views(b)]):
                dst[off:off + piece.nbytes] = piece
                off += piece.nbytes
        assert off <= dst.nbytes
