"""Which part of a chunk one worker rank holds: a ``KVSlice`` (KV heads × layers).

A chunk's identity (``keys.py``) does not depend on tensor or pipeline parallelism: every
instance of a namespace names the same prefix with the same key. What differs is which part
of the chunk's KV bytes a worker rank computes and stores: its *slice*, KV heads
``[head_start, head_end)`` of the model's ``num_heads`` and layers ``[layer_start, layer_end)``
of ``num_layers``. A puller rank pulls its own slice from the holder ranks whose slices cover
it (``p2pkv.vllm.sources``) and writes each part at the right head offset of its blocks
(``p2pkv.vllm.layout``).

The rules follow vLLM 0.32 (``model_executor/layers/linear.py``, ``QKVParallelLinear``): with
``tp_size <= num_kv_heads`` rank ``r`` holds heads ``[r*H/tp, (r+1)*H/tp)``; with fewer KV heads
than ranks each head is replicated on ``tp/H`` consecutive ranks and rank ``r`` holds head
``r // (tp/H)``. MLA's latent KV is the same on every rank: one slice for the whole instance.
Ranks with equal slices hold equal bytes, so only the lowest of them saves and registers.

Used by the connector (both roles), the directory protocol and the planner; imports nothing
of vLLM.
"""

from __future__ import annotations

import msgspec


class KVSlice(msgspec.Struct, frozen=True):
    """KV heads ``[head_start, head_end)`` of ``num_heads`` × layers ``[layer_start,
    layer_end)`` of ``num_layers``. Also a field of the directory protocol (``Register``,
    ``Holder``, ``InstanceInfo``), so it validates itself when decoded."""

    head_start: int
    head_end: int
    num_heads: int
    layer_start: int
    layer_end: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.head_start < self.head_end <= self.num_heads:
            raise ValueError(f"bad head range [{self.head_start}, {self.head_end}) of "
                             f"{self.num_heads}")
        if not 0 <= self.layer_start < self.layer_end <= self.num_layers:
            raise ValueError(f"bad layer range [{self.layer_start}, {self.layer_end}) of "
                             f"{self.num_layers}")

    @classmethod
    def whole(cls, num_heads: int, num_layers: int) -> KVSlice:
        return cls(0, num_heads, num_heads, 0, num_layers, num_layers)

    @property
    def heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def area(self) -> int:
        return self.heads * self.layers

    def same_model(self, other: KVSlice) -> bool:
        """Both are slices of one model shape (same head and layer totals)."""
        return self.num_heads == other.num_heads and self.num_layers == other.num_layers

    def intersect(self, other: KVSlice) -> KVSlice | None:
        """The part both hold, or None."""
        if not self.same_model(other):
            raise ValueError(f"slices of different shapes: {self} and {other}")
        h0, h1 = max(self.head_start, other.head_start), min(self.head_end, other.head_end)
        l0, l1 = max(self.layer_start, other.layer_start), min(self.layer_end, other.layer_end)
        if h0 >= h1 or l0 >= l1:
            return None
        return KVSlice(h0, h1, self.num_heads, l0, l1, self.num_layers)

    def contains(self, other: KVSlice) -> bool:
        return (self.same_model(other) and self.head_start <= other.head_start
                and other.head_end <= self.head_end and self.layer_start <= other.layer_start
                and other.layer_end <= self.layer_end)

    def __str__(self) -> str:
        return (f"heads {self.head_start}-{self.head_end}/{self.num_heads} "
                f"layers {self.layer_start}-{self.layer_end}/{self.num_layers}")


def tp_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` that TP rank ``tp_rank`` of ``tp_size`` computes (vLLM's
    rule, see the module docstring); ValueError where vLLM itself refuses the split."""
    if num_kv_heads <= 0 or tp_size <= 0 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad TP split: {num_kv_heads} KV heads, rank {tp_rank} of {tp_size}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {tp_size} ranks")
        per = num_kv_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    if tp_size % num_kv_heads:
        raise ValueError(f"{tp_size} ranks do not replicate {num_kv_heads} KV heads evenly")
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


def rank_slice(*, num_kv_heads: int, num_layers: int, tp_size: int, tp_rank: int,
               mla: bool = False, layers: tuple[int, int] | None = None) -> KVSlice:
    """The slice TP rank ``tp_rank`` holds. ``num_kv_heads``: the model's total (1 for MLA,
    whose latent KV every rank holds whole); ``layers``: this pipeline stage's layers
    (default all)."""
    h0, h1 = (0, num_kv_heads) if mla else tp_heads(num_kv_heads, tp_size, tp_rank)
    l0, l1 = layers if layers is not None else (0, num_layers)
    return KVSlice(h0, h1, num_kv_heads, l0, l1, num_layers)


def tp_slices(*, num_kv_heads: int, num_layers: int, tp_size: int, mla: bool = False,
              layers: tuple[int, int] | None = None) -> tuple[KVSlice, ...]:
    """Every TP rank's slice, by rank (what the scheduler side plans pulls for)."""
    return tuple(rank_slice(num_kv_heads=num_kv_heads, num_layers=num_layers, tp_size=tp_size,
                            tp_rank=r, mla=mla, layers=layers) for r in range(tp_size))


def is_lowest_replica(slices: tuple[KVSlice, ...], rank: int) -> bool:
    """Rank ``rank`` is the lowest of the ranks holding its slice: it saves and registers
    (the others hold the same bytes)."""
    return slices.index(slices[rank]) == rank
