"""Chunk identity: nominal key types and the namespace fingerprint.

A *chunk* is ``chunk_blocks`` consecutive vLLM blocks of one request's prefix. Its key is the
vLLM block hash of its last block: vLLM chains block hashes, so that one hash names the whole
prefix up to the end of the chunk (and already folds in LoRA, multimodal inputs and
``cache_salt``). Keys only mean something inside a *namespace*: a fingerprint of everything
that must match for KV bytes to be interchangeable between two instances.

Used by the connector (both roles), the directory and the store; it imports nothing of vLLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NewType

ChunkKey = NewType("ChunkKey", bytes)
"""vLLM block hash of a chunk's last block (opaque bytes, 32 bytes for sha256)."""

Namespace = NewType("Namespace", str)
"""Hex fingerprint of a :class:`NamespaceSpec`; chunks are only shared inside one."""

InstanceId = NewType("InstanceId", str)
"""One vLLM instance (its engine id); stable for the life of the process."""

MAX_KEY_BYTES = 64
"""Longest chunk key accepted from the network (vLLM's hashes are 32 bytes)."""


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    """Everything that must be equal for two instances' KV bytes to be interchangeable.

    NOTE: ``chunk_blocks`` is part of it because a key names the prefix *up to the end of its
    chunk*; instances chunking differently would name different extents with the same hash.
    The hash *seed* is deliberately not part of it: instances that claim one namespace but
    hash with different seeds must be caught loudly (by a probe hash), not split silently.
    """

    model: str
    revision: str
    kv_dtype: str
    kv_layout: str
    block_size: int
    chunk_blocks: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_size: int
    tp_rank: int
    hash_algorithm: str

    def __post_init__(self) -> None:
        for name in ("block_size", "chunk_blocks", "num_layers", "num_kv_heads", "head_size",
                     "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NamespaceSpec.{name} must be positive")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError("NamespaceSpec.tp_rank must be in [0, tp_size)")

    def fingerprint(self) -> Namespace:
        text = "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return Namespace(hashlib.sha256(text.encode()).hexdigest()[:32])


def chunk_keys(block_hashes: Sequence[bytes], chunk_blocks: int) -> list[ChunkKey]:
    """Keys of the full chunks of a prefix, in prefix order.

    Chunk ``i`` covers blocks ``[i*chunk_blocks, (i+1)*chunk_blocks)``; a trailing partial
    chunk has no key.
    """
    if chunk_blocks <= 0:
        raise ValueError("chunk_blocks must be positive")
    return [ChunkKey(bytes(block_hashes[i]))
            for i in range(chunk_blocks - 1, len(block_hashes), chunk_blocks)]
