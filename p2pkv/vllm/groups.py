"""vLLM's KV-cache groups as p2pkv sees them: which layers share a block table, and how far
back their attention reaches.

With its hybrid allocator (HMA) vLLM 0.32 splits a model's attention layers into KV-cache
groups (``v1/core/kv_cache_utils.py``, ``get_kv_cache_groups``): layers of one kind (full
attention, sliding window ``w``) share one block table, and every group has the same number of
layers and one page size, so one layer of each group shares one KV tensor
(``KVCacheConfig.kv_cache_tensors``) and a block id names the same memory in every group (one
block pool). A request has one block-id list per group; a sliding-window group holds real
blocks only for its window (``SlidingWindowManager``: the blocks before
``get_num_skipped_tokens`` are the null block, id 0) and a connector must neither write nor
expect those.

p2pkv keeps one chunk key per chunk of tokens, for all groups. A chunk's slot holds every
group, group-major, then block, then layer (:class:`~p2pkv.vllm.layout.KVLayout`); groups come
in *slot order*: full attention first, then sliding windows from the widest to the narrowest.
A chunk far enough back from the end of a hit that a window no longer reaches it needs the
groups whose attention still does, which in slot order is always a prefix of the slot: what a
pull asks for (``KVLayout.pull_batches``). The grouping joins the layout signature (and so the
hash probe): instances whose slots are grouped differently are refused by the directory
(``--disable-hybrid-kv-cache-manager`` makes vLLM use one group; such an instance is another
layout, not a wrong one).

Pure: imports nothing of vLLM at module level; :func:`kv_groups` reads a ``KVCacheConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pkv.errors import ConfigError

NULL_BLOCK = 0
"""vLLM's null block (``v1/core/block_pool.py``, ``BlockPool.__init__``: the first block of the
pool, ``is_null``): the placeholder a sliding-window group holds before its window."""


@dataclass(frozen=True, slots=True)
class KVGroup:
    """One vLLM KV-cache group: its index in ``kv_cache_groups``, its layers, and its
    sliding window in tokens (None: full attention)."""

    index: int
    layer_names: tuple[str, ...]
    window: int | None = None

    def tag(self) -> str:
        return f"{'full' if self.window is None else f'sw{self.window}'}x{len(self.layer_names)}"


def slot_order(groups: Sequence[KVGroup]) -> tuple[KVGroup, ...]:
    """Full attention first, then windows from the widest (stable within a kind)."""
    return tuple(sorted(groups, key=lambda g: (g.window is not None, -(g.window or 0), g.index)))


def describe(groups: Sequence[KVGroup]) -> str:
    """The grouping as it goes into the layout signature ("" for one full-attention group,
    so one-group layouts keep their signature)."""
    if len(groups) == 1 and groups[0].window is None:
        return ""
    return "+".join(g.tag() for g in groups)


def kv_groups(kv_cache_config: Any, device_type: str) -> tuple[KVGroup, ...]:
    """The groups of ``kv_cache_config`` in slot order; refuses (``ConfigError``) what p2pkv
    cannot save and pull exactly, naming the reason and vLLM's source."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    raw = list(kv_cache_config.kv_cache_groups)
    if not raw:
        raise ConfigError("p2pkv: the model has no KV cache groups")
    if len(raw) == 1 and type(raw[0].kv_cache_spec) is not SlidingWindowSpec:
        # one group of any attention kind (full, MLA): saved and pulled whole, as before HMA
        return (KVGroup(0, tuple(raw[0].layer_names)),)
    groups = []
    ref = None
    for i, g in enumerate(raw):
        spec = g.kv_cache_spec
        kind = type(spec)
        if kind not in (FullAttentionSpec, SlidingWindowSpec):
            raise ConfigError(
                f"p2pkv: KV cache group {i} is {kind.__name__} ({len(raw)} groups); p2pkv saves "
                "full-attention and sliding-window groups only (vllm/v1/kv_cache_interface.py; "
                "Mamba state, chunked local attention, cross attention and the like are not "
                "built)")
        if getattr(g, "is_eagle_group", False) or not getattr(g, "enable_kv_transfer", True):
            raise ConfigError(f"p2pkv: KV cache group {i} is a draft-model or non-transfer "
                              "group (KVCacheGroupSpec.is_eagle_group / enable_kv_transfer); "
                              "not supported")
        this = (spec.block_size, spec.dtype, spec.num_kv_heads, spec.head_size)
        if ref is not None and this != ref:
            raise ConfigError(
                f"p2pkv: KV cache groups differ in block size, dtype, KV heads or head size "
                f"({ref} vs {this}): one slot layout cannot hold them "
                "(vllm/v1/core/kv_cache_utils.py, get_kv_cache_groups)")
        ref = this
        window = None
        if kind is SlidingWindowSpec:
            window = int(spec.sliding_window) + int(getattr(spec, "extra_retained_tokens", 0))
        groups.append(KVGroup(i, tuple(g.layer_names), window))
    if device_type != "cpu" and len(groups) > 1:
        raise ConfigError(
            f"p2pkv: {len(groups)} KV cache groups on {device_type}: hybrid models are built "
            "for the CPU KV cache only (the GPU saver copies one block table per chunk); run "
            "vLLM with --disable-hybrid-kv-cache-manager (one group, vllm/config/vllm.py, "
            "VllmConfig.__post_init__) to serve this model without the window's savings")
    return slot_order(groups)


def has_window(groups: Sequence[KVGroup]) -> bool:
    return any(g.window is not None for g in groups)


def slot_block_ids(groups: Sequence[KVGroup], per_group: Sequence[Sequence[Any]],
                   start: int, stop: int) -> tuple[Any, ...]:
    """Blocks ``[start, stop)`` of every group, in slot order, flattened (what a
    ``SavePlan``/``ChunkLoad`` carries): ``per_group`` is indexed by vLLM's group index."""
    return tuple(x for g in groups for x in per_group[g.index][start:stop])


def needed_prefix(block_ids: Sequence[int | None], num_groups: int) -> int:
    """How many groups (a prefix in slot order) a pulled chunk must fill: the last group
    with a block to write, counted from the first. ``block_ids``: flattened, ``None`` for a
    block not to write."""
    per = len(block_ids) // num_groups
    for k in range(num_groups, 0, -1):
        if any(b is not None for b in block_ids[(k - 1) * per:k * per]):
            return k
    return 0
