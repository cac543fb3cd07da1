"""Connector config decoding and the CPU KV layout (tensors of the real CPU shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pkv.errors import ConfigError
from p2pkv.vllm.config import ConnectorConfig

torch = pytest.importorskip("torch")

from p2pkv.vllm.layout import KVLayout  # noqa: E402


def test_only_directory_is_required():
    c = ConnectorConfig.from_extra_config({"directory": "tcp://127.0.0.1:7420"})
    assert c.transport == "auto" and c.chunk_tokens == 128


@pytest.mark.parametrize("extra, message", [
    ({}, "directory"),
    ({"directory": "127.0.0.1:1"}, "tcp://"),
    ({"directory": "tcp://h:1", "chunk_tokens": 0}, "chunk_tokens"),
    ({"directory": "tcp://h:1", "transport": "carrier-pigeon"}, "transport"),
    ({"directory": "tcp://h:1", "store_gib": "lots"}, "store_gib"),
    ({"directory": "tcp://h:1", "diretcory": "x"}, "unknown"),
    ({"directory": "tcp://h:1", "log_level": "LOUD"}, "log_level"),
    ({"directory": "tcp://h:1", "chunk_digest": "md5"}, "chunk_digest"),
    ({"directory": "tcp://h:1", "chunk_digest": "keyed"}, "secret_file"),
])
def test_bad_config_is_refused_with_a_clear_message(extra, message):
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra_config(extra)


def test_strings_from_json_are_converted():
    c = ConnectorConfig.from_extra_config({"directory": "tcp://h:1", "store_gib": "0.5",
                                           "pull_threads": "2"})
    assert c.store_gib == 0.5 and c.pull_threads == 2


def test_chunk_digest_defaults_to_auto_and_reaches_the_transport_typed():
    assert ConnectorConfig.from_extra_config({"directory": "tcp://h:1"}).digest == "auto"
    c = ConnectorConfig.from_extra_config({"directory": "tcp://h:1", "chunk_digest": "keyed",
                                           "secret_file": "/etc/p2pkv/secret"})
    assert c.digest == "keyed"


def cpu_caches(layers=3, blocks=5):
    # the CPU backend's per-layer shape: [num_blocks, kv_heads, block_size, 2*head_size]
    return {f"layer.{i}": torch.randn(blocks, 3, 8, 16) for i in range(layers)}


def test_block_views_and_copy_out_agree_with_the_tensors():
    caches = cpu_caches()
    layout = KVLayout.from_kv_caches(caches)
    assert layout.block_bytes == 3 * 8 * 16 * 4 and layout.num_blocks == 5
    slot = bytearray(layout.chunk_bytes(2))
    layout.copy_out([4, 1], memoryview(slot))
    got = np.frombuffer(slot, dtype=np.float32).reshape(2, 3, 3, 8, 16)
    for j, b in enumerate([4, 1]):
        for i, t in enumerate(caches.values()):
            assert np.array_equal(got[j, i], t[b].numpy())


def test_writing_through_block_views_lands_in_the_cache():
    caches = cpu_caches()
    layout = KVLayout.from_kv_caches(caches)
    for v in layout.block_views(2):
        v[:] = bytes(len(v))
    for t in caches.values():
        assert torch.count_nonzero(t[2]) == 0 and torch.count_nonzero(t[1]) > 0


def test_layers_inside_one_backing_tensor_with_a_block_stride():
    backing = torch.randn(5, 2, 3, 8, 16)  # [blocks, layers, ...] like a shared allocation
    caches = {f"layer.{i}": backing[:, i] for i in range(2)}
    layout = KVLayout.from_kv_caches(caches)
    (v0, v1) = layout.block_views(3)
    assert bytes(v1) == backing[3, 1].numpy().tobytes()


def test_unsupported_layouts_are_refused():
    with pytest.raises(ConfigError):
        KVLayout.from_kv_caches({})
    with pytest.raises(ConfigError):  # a broadcast (stride 0) cache is not memory we can copy
        KVLayout.from_kv_caches({"a": torch.randn(5, 1, 8, 16).expand(5, 3, 8, 16)})
    with pytest.raises(ConfigError):  # layers must agree
        KVLayout.from_kv_caches({"a": torch.randn(5, 3, 8, 16), "b": torch.randn(5, 3, 8, 8)})
    with pytest.raises(ValueError):
        KVLayout.from_kv_caches(cpu_caches()).block_views(99)


# GPU attention backends' layouts, as CPU tensors of the same shapes and strides. vLLM 0.32
# hands every backend's cache as a logical [blocks, H, N, C] view of a physical layout.
B, H, N, C = 6, 3, 16, 128  # C = K‖V of head_size 64


def physical(order: str, layers: int = 2) -> tuple[dict, list]:
    """Caches whose memory is laid out as ``order`` (e.g. "BNHC"), seen as [B, H, N, C]."""
    sizes = {"B": B, "H": H, "N": N, "C": C}
    raws = [torch.randn(*(sizes[d] for d in order)) for _ in range(layers)]
    perm = [order.index(d) for d in "BHNC"]
    return {f"layer.{i}": r.permute(*perm) for i, r in enumerate(raws)}, raws


@pytest.mark.parametrize("order, segments", [
    ("BHNC", 1),  # HND (FlashInfer), and the CPU layout
    ("BNHC", 1),  # NHD (FlashAttention): K‖V per token and head
    ("HBNC", H),  # heads outside blocks: one segment per head
])
def test_gpu_layouts_copy_whole_blocks_exactly(order, segments):
    src, raws = physical(order)
    layout = KVLayout.from_kv_caches(src)
    assert len(layout.segments) == segments
    assert layout.block_bytes == H * N * C * 4
    slot = bytearray(layout.chunk_bytes(2))
    layout.copy_out([5, 2], memoryview(slot))
    # a second instance with the same layout receives the slot into other blocks
    dst, _ = physical(order)
    for t in dst.values():
        t.zero_()
    into = KVLayout.from_kv_caches(dst)
    pieces = [v for b in (0, 3) for v in into.block_views(b)]
    off = 0
    for v in pieces:
        v[:] = slot[off:off + v.nbytes]
        off += v.nbytes
    assert off == len(slot)
    for name in src:
        assert torch.equal(dst[name][0], src[name][5]) and torch.equal(dst[name][3], src[name][2])
        assert torch.count_nonzero(dst[name][1]) == 0  # nothing outside the target blocks


def test_layouts_that_do_not_copy_exactly_have_different_signatures():
    sigs = {order: KVLayout.from_kv_caches(physical(order)[0]).signature
            for order in ("BHNC", "BNHC", "HBNC")}
    assert len(set(sigs.values())) == 3
    assert sigs["BHNC"] == KVLayout.from_kv_caches(cpu_caches(blocks=B)).signature.replace(
        "8x16", f"{N}x{C}")


def test_the_signature_does_not_depend_on_this_ranks_head_count():
    # the ranks of a TP 1 and a TP 2 instance (4 and 2 KV heads each) must agree (the probe)
    whole = KVLayout.from_kv_caches({"l": torch.zeros(5, 4, 8, 16)})
    half = KVLayout.from_kv_caches({"l": torch.zeros(5, 2, 8, 16)})
    one = KVLayout.from_kv_caches({"l": torch.zeros(5, 1, 8, 16)})
    assert whole.signature == half.signature == one.signature
    assert (whole.heads, half.heads) == (4, 2)
    assert whole.head_bytes == half.head_bytes == one.head_bytes == 8 * 16 * 4
    assert KVLayout.from_kv_caches({"l": torch.zeros(5, 3, 8, 16)}).signature != \
        KVLayout.from_kv_caches({"l": torch.zeros(5, 3, 8, 8)}).signature  # other head size


def test_part_dest_is_the_parts_heads_in_every_block_and_layer():
    from p2pkv.slices import KVSlice

    caches = {f"l{i}": torch.zeros(5, 2, 8, 16) for i in range(3)}
    layout = KVLayout.from_kv_caches(caches)
    mine = KVSlice(2, 4, 4, 0, 3, 3)  # rank 1 of TP 2: heads 2-3 of 4
    part = KVSlice(3, 4, 4, 0, 3, 3)  # head 3 only
    pieces = layout.part_dest([4, None, 1], mine, part)
    assert len(pieces) == 3 + 1 + 3 and pieces[3].nbytes == 3 * layout.head_bytes
    for i, p in enumerate(pieces):
        p[:] = bytes([i + 1]) * p.nbytes
    for i, t in enumerate(caches.values()):
        as_bytes = t.view(torch.uint8)  # [5, 2, 8, 64] bytes
        assert torch.all(as_bytes[4, 1] == i + 1) and torch.all(as_bytes[1, 1] == 4 + i + 1)
        assert torch.count_nonzero(as_bytes[:, 0]) == 0  # head 2 untouched
    assert layout.part_dest([0], mine, mine) == layout.chunk_dest([0])
    with pytest.raises(ValueError):
        layout.part_dest([0], mine, KVSlice(0, 1, 4, 0, 3, 3))  # not this rank's head


@pytest.mark.parametrize("order", ["BHNC", "BNHC"])
def test_whole_chunk_copies_match_the_piece_by_piece_slot_order(order):
    """DeviceBlocks (GPU: one indexed copy per layer) reads and writes exactly the bytes, in
    exactly the slot order, of the piece-by-piece path (run here on CPU tensors)."""
    import dataclasses

    from p2pkv.vllm.layout import DeviceBlocks

    src, _ = physical(order, layers=3)
    layout = KVLayout.from_kv_caches(src)
    slot = bytearray(layout.chunk_bytes(3))
    layout.copy_out([5, 0, 2], memoryview(slot))
    as_torch = dataclasses.replace(layout, rows=tuple(
        b.as_strided((B, layout.block_bytes), (layout.block_stride, 1), f)
        for b, f in zip(layout.bases, layout.first)))
    out = torch.zeros(len(slot), dtype=torch.uint8)
    DeviceBlocks(as_torch, [5, 0, 2]).read_into(out)
    assert bytes(out.numpy()) == bytes(slot)

    dst, _ = physical(order, layers=3)
    for t in dst.values():
        t.zero_()
    into = KVLayout.from_kv_caches(dst)
    into = dataclasses.replace(into, rows=tuple(
        b.as_strided((B, into.block_bytes), (into.block_stride, 1), f)
        for b, f in zip(into.bases, into.first)))
    DeviceBlocks(into, [1, None, 4]).write_from(torch.frombuffer(slot, dtype=torch.uint8))
    for name in src:
        assert torch.equal(dst[name][1], src[name][5]) and torch.equal(dst[name][4], src[name][2])
        assert torch.count_nonzero(dst[name][0]) == 0  # the None block's bytes were dropped


def test_copy_out_by_runs_of_consecutive_blocks_matches_block_by_block():
    """Issue 17: copy_out copies one run of consecutive block ids per layer at once; the slot
    is still block-major, then layer, byte for byte."""
    from p2pkv.vllm.layout import block_runs

    assert block_runs([2, 3, 4, 7, 8, 1], 10) == [(0, 2, 3), (3, 7, 2), (5, 1, 1)]
    caches = cpu_caches(layers=4, blocks=10)
    layout = KVLayout.from_kv_caches(caches)
    ids = [2, 3, 4, 7, 8, 1]
    slot = bytearray(layout.chunk_bytes(len(ids)))
    layout.copy_out(ids, memoryview(slot))
    want = b"".join(t[b].numpy().tobytes() for b in ids for t in caches.values())
    assert bytes(slot) == want
    with pytest.raises(ValueError):
        layout.copy_out([9, 10], memoryview(slot))
