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
directory compares between members of a namespace. It names the layout *per KV head* (dtype,
the shape below the head dimension, stride order), never this rank's head count, so ranks of
instances at different tensor parallelism agree.

Tensor parallelism: a rank's blocks hold its KV heads only (its :class:`~p2pkv.slices.KVSlice`).
Where the heads are the outermost dimension of a block and a block is one segment (CPU's
``LBHNC``, GPU's HND), a range of heads inside one (block, layer) is one dense byte range of
``heads * head_bytes``: :meth:`KVLayout.part_dest` gives those ranges as a pull's destination
and :func:`part_selection` the bytes a holder rank sends for a part of its slice. Elsewhere
(``head_bytes == 0``, e.g. FlashAttention's NHD) only equal slices are exchanged.

The pieces are ``memoryview`` for a CPU cache and 1-D uint8 CUDA tensors for a GPU cache, or
one :class:`DeviceBlocks` per chunk (the transport's destination pieces:
``transport.base.Piece``). Saving from a GPU cache is an asynchronous device-to-host copy
(:mod:`p2pkv.vllm.gpu`); the CUDA helpers both use live in :mod:`p2pkv.cuda`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from p2pkv.cuda import gather_copy, side_stream
from p2pkv.errors import ConfigError
from p2pkv.slices import KVSlice
from p2pkv.transport.base import DeviceChunk, Piece
from p2pkv.transport.selection import Selection
from p2pkv.vllm.groups import KVGroup, describe, needed_prefix


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
    heads: int = 1  # this rank's KV heads (dimension 1 of a 4-D cache; 1 for MLA's 3-D one)
    head_bytes: int = 0  # bytes of one head in one block where a head range is dense, else 0
    # vLLM's KV-cache groups in slot order (``p2pkv.vllm.groups``): the layer indices of each;
    # () is one group of every layer. Block ids of a chunk are then flattened per group, in
    # this order: ``len(groups) * chunk_blocks`` of them.
    groups: tuple[tuple[int, ...], ...] = ()

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
        heads = int(shape[1]) if len(shape) == 4 else 1
        per_head = shape[2:] if len(shape) == 4 else shape[1:]
        segs = "1" if len(segments) == 1 else "head" if len(segments) == heads else \
            f"{len(segments) // heads}xhead" if len(segments) % heads == 0 else str(len(segments))
        # NOTE: nothing in the signature may depend on this rank's head count (shape[1]):
        # instances at different TP must agree (see the module docstring).
        signature = f"{str(dtype).removeprefix('torch.')}/{len(shape)}d/" \
                    f"{'x'.join(map(str, per_head))}/order{order}/seg{segs}"
        head_bytes = 0
        if len(segments) == 1 and segments[0][0] == 0 and (
                len(shape) == 3 or heads == 1 or strides[1] == max(strides[1:])):
            head_bytes = segments[0][1] // heads
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
                   int(shape[0]), device, signature, rows, heads, head_bytes)

    def with_groups(self, groups: Sequence[KVGroup]) -> KVLayout:
        """This layout with vLLM's KV-cache groups (slot order); one full-attention group of
        every layer is the layout itself. The grouping joins the signature."""
        tag = describe(groups)
        if not tag:
            return self
        index = {name: i for i, name in enumerate(self.layer_names)}
        missing = [n for g in groups for n in g.layer_names if n not in index]
        listed = sorted(index[n] for g in groups for n in g.layer_names if n in index)
        if missing or listed != list(range(self.num_layers)):
            raise ConfigError(f"p2pkv: vLLM's KV cache groups ({tag}) do not cover the "
                              f"registered layers exactly ({self.layer_names}; missing "
                              f"{missing})")
        signature = f"{self.signature}/groups{tag}"
        if len(groups) == 1:  # one sliding-window group: blocks as before, nulls not written
            return replace(self, signature=signature)
        return replace(self, groups=tuple(tuple(index[n] for n in g.layer_names)
                                          for g in groups), signature=signature)

    @property
    def num_layers(self) -> int:
        return len(self.bases)

    @property
    def num_groups(self) -> int:
        return max(1, len(self.groups))

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Layers per group, in slot order."""
        return tuple(len(g) for g in self._group_layers())

    def _group_layers(self) -> tuple[tuple[int, ...], ...]:
        return self.groups or (tuple(range(self.num_layers)),)

    def _blocks_by_group(self, block_ids: Sequence[int | None]
                         ) -> list[tuple[tuple[int, ...], int | None]]:
        """(layers of its group, block id) for every block of a chunk, in slot order."""
        layers = self._group_layers()
        if len(block_ids) % len(layers):
            raise ValueError(f"{len(block_ids)} block ids for {len(layers)} KV cache groups")
        per = len(block_ids) // len(layers)
        return [(ls, b) for gi, ls in enumerate(layers) for b in block_ids[gi * per:(gi + 1) * per]]

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
        if self.on_gpu and self.rows and not self.groups:
            return (DeviceBlocks(self, block_ids),)
        if self.groups:
            assert self.rows and not self.on_gpu, "hybrid layouts are CPU-only (groups.py)"
            return tuple(memoryview(self.rows[layer][b]) if b is not None else
                         memoryview(bytearray(self.block_bytes))
                         for ls, b in self._blocks_by_group(block_ids) for layer in ls)
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

    def part_dest(self, block_ids: Sequence[int | None], mine: KVSlice, part: KVSlice
                  ) -> tuple[Any, ...]:
        """Where ``part`` (heads x layers inside this rank's slice ``mine``) of a pulled chunk
        goes: per block, per layer of the part, the byte range of the part's heads (a
        ``None`` block: scratch). The whole slice is :meth:`chunk_dest`."""
        if part == mine:
            return self.chunk_dest(block_ids)
        if not mine.contains(part):
            raise ValueError(f"part {part} is not inside this rank's slice {mine}")
        if mine.layers != self.num_layers or mine.heads != self.heads:
            raise ValueError(f"slice {mine} does not match this cache ({self.heads} heads, "
                             f"{self.num_layers} layers)")
        if not self.head_bytes or not self.rows:
            raise ValueError(f"p2pkv: a head range is not contiguous in this KV layout "
                             f"({self.signature})")
        off = (part.head_start - mine.head_start) * self.head_bytes
        n = part.heads * self.head_bytes
        if self.groups:
            if part.layers != mine.layers:
                raise ValueError("p2pkv: a layer range of a hybrid layout's chunk is not built")
            return tuple(memoryview(self.rows[layer][b, off:off + n]) if b is not None else
                         memoryview(bytearray(n))
                         for ls, b in self._blocks_by_group(block_ids) for layer in ls)
        layers = range(part.layer_start - mine.layer_start, part.layer_end - mine.layer_start)
        pieces: list[Any] = []
        for b in block_ids:
            if b is None:
                if self.on_gpu:
                    import torch

                    pieces.append(torch.empty(n * len(layers), dtype=torch.uint8,
                                              device=self.device))
                else:
                    pieces.append(memoryview(bytearray(n * len(layers))))
                continue
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} out of range")
            for layer in layers:
                # NOTE: on a GPU (heads outside tokens, e.g. HND) a piece is a device view;
                # the scheduler side still plans GPU pulls between equal slices only, this
                # serves scripts/gpu_check.py's heterogeneous-TP case
                row = self.rows[layer][b, off:off + n]
                pieces.append(row if self.on_gpu else memoryview(row))
        return tuple(pieces)

    def pull_dest(self, block_ids: Sequence[int | None], mine: KVSlice, part: KVSlice,
                  num_groups: int) -> tuple[Any, ...]:
        """:meth:`part_dest` of the first ``num_groups`` groups (slot order) of a chunk only:
        where a pull of :func:`pull_selection` lands."""
        if not self.groups or num_groups >= self.num_groups:
            return self.part_dest(block_ids, mine, part)
        if part.layers != mine.layers or not mine.contains(part) or not self.head_bytes:
            raise ValueError(f"p2pkv: cannot pull part {part} of {mine} group by group")
        off = (part.head_start - mine.head_start) * self.head_bytes
        n = part.heads * self.head_bytes
        per = len(block_ids) // self.num_groups
        return tuple(memoryview(self.rows[layer][b, off:off + n]) if b is not None else
                     memoryview(bytearray(n))
                     for ls, b in self._blocks_by_group(block_ids)[:num_groups * per]
                     for layer in ls)

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
        if self.groups:
            for ls, b in self._blocks_by_group(block_ids):
                assert b is not None
                for layer in ls:
                    piece = self.rows[layer][b]
                    dst[off:off + piece.nbytes] = piece
                    off += piece.nbytes
            assert off <= dst.nbytes
            return
        if self.rows:
            # NOTE (issue 17): one copy per layer per run of consecutive block ids (vLLM hands
            # out fresh blocks in order, so a chunk is mostly one run), not one per (block,
            # layer): the per-piece Python work was a third of a warm copy's time
            n, bb = len(block_ids), self.block_bytes
            d3 = dst[:n * self.num_layers * bb].reshape(n, self.num_layers, bb)
            for at, first, count in block_runs(block_ids, self.num_blocks):
                for layer, rows in enumerate(self.rows):
                    d3[at:at + count, layer] = rows[first:first + count]
            return
        for b in block_ids:
            for piece in [np.frombuffer(v, np.uint8) for v in self.block_views(b)]:
                dst[off:off + piece.nbytes] = piece
                off += piece.nbytes
        assert off <= dst.nbytes


def block_runs(block_ids: Sequence[int], num_blocks: int) -> list[tuple[int, int, int]]:
    """``block_ids`` as runs of consecutive ids: ``(position in block_ids, first id, count)``.
    Raises ``ValueError`` for an id outside ``[0, num_blocks)``."""
    runs: list[tuple[int, int, int]] = []
    for at, b in enumerate(block_ids):
        if not 0 <= b < num_blocks:
            raise ValueError(f"block id {b} out of range")
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((at, b, 1))
    return runs


def part_selection(holder: KVSlice, part: KVSlice, head_bytes: int) -> Selection | None:
    """The bytes of a holder rank's stored chunk (slice ``holder``, slot order: block, layer,
    heads) that make ``part``; None when the part is the whole slice. ``head_bytes``: bytes
    of one head in one block (the same on every rank of a namespace: the probe says so)."""
    if part == holder:
        return None
    if not holder.contains(part):
        raise ValueError(f"part {part} is not inside the holder's slice {holder}")
    if head_bytes <= 0:
        raise ValueError("a head range is not contiguous in this KV layout")
    return Selection(rows=holder.layers, row_bytes=holder.heads * head_bytes,
                     first_row=part.layer_start - holder.layer_start, num_rows=part.layers,
                     offset=(part.head_start - holder.head_start) * head_bytes,
                     length=part.heads * head_bytes)


def pull_selection(holder: KVSlice, part: KVSlice, head_bytes: int,
                   group_layers: Sequence[int], num_groups: int, chunk_blocks: int
                   ) -> Selection | None:
    """The bytes of a holder rank's chunk that make ``part`` of its first ``num_groups``
    KV-cache groups (slot order; ``group_layers``: layers per group). A hybrid slot is
    group-major, then block, then layer, every (block, layer) one row of the holder's heads,
    so the first groups are the first rows: one selection. All groups: :func:`part_selection`."""
    if num_groups >= len(group_layers):
        return part_selection(holder, part, head_bytes)
    if not holder.contains(part) or part.layers != holder.layers or head_bytes <= 0:
        raise ValueError(f"p2pkv: cannot select part {part} of {holder} group by group")
    return Selection(rows=chunk_blocks * sum(group_layers),
                     row_bytes=holder.heads * head_bytes, first_row=0,
                     num_rows=chunk_blocks * sum(group_layers[:num_groups]),
                     offset=(part.head_start - holder.head_start) * head_bytes,
                     length=part.heads * head_bytes)


def pull_batches(layout: KVLayout, block_ids: Sequence[Sequence[int | None]]
                 ) -> list[tuple[int, list[int]]]:
    """The chunks of a load (their flattened block ids) by how many groups each needs (a
    prefix in slot order, ``groups.needed_prefix``): ``(num_groups, chunk indices)``, the most
    groups first. A chunk whose sliding windows have moved past it needs only the groups
    whose attention still reaches it; one pull per distinct count (a pull has one
    selection)."""
    n = layout.num_groups
    by: dict[int, list[int]] = {}
    for i, ids in enumerate(block_ids):
        k = max(1, needed_prefix(ids, n)) if layout.groups else n
        by.setdefault(k, []).append(i)
    return sorted(by.items(), reverse=True)


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
