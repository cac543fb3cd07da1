"""WorkerSide over a real TCP transport on loopback, with a recording directory stand-in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="p2pkv.vllm.metadata subclasses vLLM's metadata type")

from p2pkv.keys import ChunkKey, InstanceId, Namespace  # noqa: E402
from p2pkv.transport.peer import PeerTransport  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.layout import KVLayout  # noqa: E402
from p2pkv.vllm.metadata import ChunkLoad, LoadPlan, P2PKVMetadata, SavePlan  # noqa: E402
from p2pkv.vllm.worker import WorkerSide  # noqa: E402


@dataclass
class RecordingDirectory:
    """Stands in for DirectoryClient (which keeps the registration alive by itself)."""

    registered: list = field(default_factory=list)
    published: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    unregistered: bool = False

    def register(self, registration, wait_connected_s=0.0):
        self.registered.append(registration.address)

    def publish(self, added=(), removed=()):
        self.published.append((list(added), list(removed)))

    def report(self, counters):
        self.reports.append(dict(counters))

    def unregister(self):
        self.unregistered = True

    def close(self):
        pass


def make_worker(directory, blocks=8):
    caches = {f"l{i}": torch.randn(blocks, 2, 4, 8) for i in range(3)}
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", store_gib=0.001, pull_timeout_s=2)
    w = WorkerSide(config, instance=InstanceId("i"), namespace=Namespace("ns"), chunk_blocks=2,
                   transport=PeerTransport(), directory=directory)
    w.register_kv_caches(KVLayout.from_kv_caches(caches))
    return w, caches


def wait_finished(w: WorkerSide, req_id: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while req_id not in w.take_finished_recving():
        assert time.monotonic() < deadline, "load never finished"
        time.sleep(0.01)


def test_saved_chunk_is_published_and_pulled_byte_exact_into_other_blocks():
    d = RecordingDirectory()
    holder, h_caches = make_worker(d)
    puller, p_caches = make_worker(RecordingDirectory())
    key = ChunkKey(b"k" * 32)
    holder.save(P2PKVMetadata(saves=[SavePlan(key, (5, 2))]))
    assert d.published[-1] == ([key], [])
    address = d.registered[0]
    puller.start_loads(P2PKVMetadata(loads=[LoadPlan("r", address, (ChunkLoad(key, (0, 7)),))]))
    wait_finished(puller, "r")
    assert puller.take_failed_blocks() == set()
    for name in h_caches:
        assert torch.equal(p_caches[name][0], h_caches[name][5])
        assert torch.equal(p_caches[name][7], h_caches[name][2])
    assert puller.counters.chunks_pulled == 1
    assert puller.counters.bytes_pulled == 2 * 3 * 2 * 4 * 8 * 4
    holder.shutdown()
    puller.shutdown()


def test_missing_chunk_and_dead_peer_report_their_blocks_as_failed():
    d = RecordingDirectory()
    holder, _ = make_worker(d)
    puller, _ = make_worker(RecordingDirectory())
    missing = ChunkLoad(ChunkKey(b"m" * 32), (None, 3))  # first block was a local hit
    puller.start_loads(P2PKVMetadata(loads=[LoadPlan("r1", d.registered[0], (missing,))]))
    wait_finished(puller, "r1")
    assert puller.take_failed_blocks() == {3}
    holder.shutdown()  # its server is gone: connection refused
    dead = ChunkLoad(ChunkKey(b"k" * 32), (4, 5))
    puller.start_loads(P2PKVMetadata(loads=[LoadPlan("r2", d.registered[0], (dead,))]))
    wait_finished(puller, "r2")
    assert puller.take_failed_blocks() == {4, 5}
    assert puller.counters.chunks_failed == 1 and puller.counters.chunks_missing == 1
    puller.shutdown()


def test_worker_registers_once_publishes_deltas_and_unregisters():
    d = RecordingDirectory()
    w, _ = make_worker(d)
    keys = [ChunkKey(bytes([i]) * 32) for i in range(2)]
    w.save(P2PKVMetadata(saves=[SavePlan(keys[0], (0, 1))]))
    w.save(P2PKVMetadata(saves=[SavePlan(keys[1], (2, 3))]))
    assert len(d.registered) == 1
    assert d.published == [([keys[0]], []), ([keys[1]], [])]
    w.take_finished_recving()
    assert d.reports and d.reports[-1]["chunks_saved"] == 2
    w.shutdown()
    assert d.unregistered
