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
    Nor is tensor or pipeline parallelism: instances at different TP name the same chunks,
    and each worker rank holds a slice of a chunk (``p2pkv.slices``); ``num_kv_heads`` and
    ``num_layers`` are the model's totals, not one rank's share.
    """

    model: str
    revision: str
    kv_dtype: str
    device_type: str
    block_size: int
    chunk_blocks: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    hash_algorithm: str

    def __post_init__(self) -> None:
        for name in ("block_size", "chunk_blocks", "num_layers", "num_kv_heads", "head_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NamespaceSpec.{name} must be positive")

    def describe(self) -> str:
        """The fields as ``k=v|k=v`` (sorted): what the fingerprint hashes, and what a
        registration carries so that ``p2pkv doctor`` can say *why* two namespaces differ."""
        return "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))

    def fingerprint(self) -> Namespace:
        return Namespace(hashlib.sha256(self.describe().encode()).hexdigest()[:32])


def chunk_keys(block_hashes: Sequence[bytes], chunk_blocks: int) -> list[ChunkKey]:
    """Keys of the full chunks of a prefix, in prefix order.

    Chunk ``i`` covers blocks ``[i*chunk_blocks, (i+1)*chunk_blocks)``; a trailing partial
    chunk has no key.
    """
    if chunk_blocks <= 0:
        raise ValueError("chunk_blocks must be positive")
    return [ChunkKey(bytes(block_hashes[i]))
            for i in range(chunk_blocks - 1, len(block_hashes), chunk_blocks)]


PARTIAL_KEY_DOMAIN = b"p2pkv/partial-chunk/v1\0"
"""Prefix of every partial-chunk key's hash input. vLLM hashes full blocks only (over a
pickled tuple, or CBOR), never this byte string, so a partial key cannot equal a full
chunk's key; and it is longer than any xxhash-family block hash."""


def partial_chunk_key(block_hashes: Sequence[bytes], prompt_token_ids: Sequence[int],
                      block_size: int, chunk_blocks: int) -> ChunkKey | None:
    """Key of a prompt's last, shorter chunk (the tokens after its last full chunk), or None
    when there is none (the prompt ends on a chunk boundary) or it cannot be named safely.

    NOTE: the key chains onto a vLLM block hash, which already folds in everything before it
    (``cache_salt`` and LoRA in particular): the last full chunk's key, or where the prompt
    has no full chunk, its first full block's hash. A prompt shorter than one block has
    neither and gets no partial key (decode then recomputes less than one block anyway).
    The tail's token ids and their count are hashed in, so two tails of different lengths
    never share a key.
    """
    chunk_tokens = block_size * chunk_blocks
    full_chunks = len(prompt_token_ids) // chunk_tokens
    tail = prompt_token_ids[full_chunks * chunk_tokens:]
    if not tail:
        return None
    anchor = full_chunks * chunk_blocks - 1 if full_chunks else 0
    if anchor >= len(block_hashes):
        return None
    h = hashlib.sha256(PARTIAL_KEY_DOMAIN)
    h.update(bytes(block_hashes[anchor]))
    h.update(len(tail).to_bytes(4, "little"))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tail))
    return ChunkKey(h.digest())


def prompt_keys(block_hashes: Sequence[bytes], prompt_token_ids: Sequence[int],
                block_size: int, chunk_blocks: int, *, with_partial: bool) -> list[ChunkKey]:
    """The keys a request's prompt is looked up by, in prefix order: its full chunks, then
    (``with_partial``) its partial chunk's key. Shared by the connector and the router so
    both name a prompt's chunks the same way."""
    num_full_blocks = len(prompt_token_ids) // block_size
    keys = chunk_keys(block_hashes[:num_full_blocks], chunk_blocks)
    if with_partial:
        partial = partial_chunk_key(block_hashes, prompt_token_ids, block_size, chunk_blocks)
        if partial is not None:
            keys.append(partial)
    return keys


def probe_of(none_hash: bytes) -> str:
    """The directory's compatibility probe for a process whose vLLM ``NONE_HASH`` (the seed
    of every block-hash chain) is ``none_hash``; hashed again so the directory never sees
    NONE_HASH itself."""
    return hashlib.sha256(b"p2pkv-probe/" + bytes(none_hash)).hexdigest()[:16]


def seed_part(probe: str) -> str:
    """The hash-seed part of a registered probe ("<seed probe>.<layout hash>" from a worker,
    see ``vllm/worker.py``): what a process without a KV cache (the router) can compare."""
    return probe.split(".", 1)[0]
