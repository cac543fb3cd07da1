"""Which bytes of vLLM's paged KV cache form a chunk, and how they sit in a store slot.

vLLM hands the worker one tensor per attention layer. On the CPU backend (layout LBHNC) each
is ``[num_blocks, num_kv_heads, block_size, 2*head_size]``: block ``b`` of a layer is one
contiguous byte range. A chunk of ``chunk_blocks`` blocks is therefore ``chunk_blocks ×
num_layers`` ranges; in a store slot they are laid out block-major, then layer::

    slot = [block 0: layer 0 | layer 1 | ... ][block 1: layer 0 | ...] ...

Copying whole blocks between instances with the same namespace is exact. Layouts whose block
dimension is not outermost (GPU FlashAttention's ``[2, num_blocks, ...]``) are refused here
with a clear error until the GPU path exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pkv.errors import ConfigError


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Byte views of every layer's blocks, in the model's layer order."""

    layer_names: tuple[str, ...]
    rows: tuple[np.ndarray, ...]  # per layer: uint8 [num_blocks, block_bytes] view of the cache
    block_bytes: int
    num_blocks: int

    @classmethod
    def from_kv_caches(cls, kv_caches: Mapping[str, object]) -> KVLayout:
        import torch

        names, rows = [], []
        block_bytes = num_blocks = None
        for name, t in kv_caches.items():
            assert isinstance(t, torch.Tensor)
            if t.device.type != "cpu":
                raise ConfigError(f"p2pkv: KV cache on {t.device.type} is not supported yet "
                                  "(CPU layout only in this release)")
            if not t[0].is_contiguous():
                raise ConfigError(f"p2pkv: layer {name} has non-contiguous blocks {tuple(t.shape)}")
            esize = t.element_size()
            bb = t[0].numel() * esize
            if block_bytes not in (None, bb) or num_blocks not in (None, t.shape[0]):
                raise ConfigError("p2pkv: layers with different block shapes are not supported")
            block_bytes, num_blocks = bb, t.shape[0]
            flat = t.detach().view(torch.uint8).numpy()  # shares memory with the cache
            rows.append(np.lib.stride_tricks.as_strided(
                flat, shape=(num_blocks, bb), strides=(t.stride(0) * esize, 1)))
            names.append(name)
        if not names:
            raise ConfigError("p2pkv: no KV cache layers registered")
        return cls(tuple(names), tuple(rows), int(block_bytes), int(num_blocks))

    @property
    def num_layers(self) -> int:
        return len(self.rows)

    def chunk_bytes(self, chunk_blocks: int) -> int:
        return chunk_blocks * self.num_layers * self.block_bytes

    def block_views(self, block_id: int) -> list[memoryview]:
        """The destination pieces of one block, in slot order (layer by layer)."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range")
        return [memoryview(r[block_id]) for r in self.rows]

    def copy_out(self, block_ids: Sequence[int], slot: memoryview) -> None:
        """Copy the chunk made of ``block_ids`` from the cache into a store slot."""
        dst = np.frombuffer(slot, dtype=np.uint8)
        bb, off = self.block_bytes, 0
        for b in block_ids:
            for r in self.rows:
                dst[off:off + bb] = r[b]
                off += bb
        assert off <= dst.nbytes
