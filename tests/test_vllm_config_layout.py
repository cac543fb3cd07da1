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
])
def test_bad_config_is_refused_with_a_clear_message(extra, message):
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra_config(extra)


def test_strings_from_json_are_converted():
    c = ConnectorConfig.from_extra_config({"directory": "tcp://h:1", "store_gib": "0.5",
                                           "pull_threads": "2"})
    assert c.store_gib == 0.5 and c.pull_threads == 2


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
    with pytest.raises(ConfigError):
        KVLayout.from_kv_caches({"a": torch.randn(2, 5, 3, 8)[0:2].transpose(1, 2)})
    with pytest.raises(ValueError):
        KVLayout.from_kv_caches(cpu_caches()).block_views(99)
