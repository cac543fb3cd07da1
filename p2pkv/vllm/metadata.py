"""What the scheduler side tells the workers each step (pickled by vLLM).

Typed, small, and free of vLLM objects so the worker needs nothing but these fields. The same
metadata goes to every worker rank; a load names each rank's sources and every rank takes
its own (``LoadPlan.sources[rank]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from p2pkv.keys import ChunkKey
from p2pkv.vllm.planning import PullSample
from p2pkv.vllm.sources import Source


@dataclass(frozen=True, slots=True)
class ChunkLoad:
    """Pull chunk ``key`` into ``block_ids``; ``None`` marks a block already computed locally
    (its bytes are received and dropped)."""

    key: ChunkKey
    block_ids: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Pull ``chunks`` for request ``req_id``: worker rank ``r`` pulls from ``sources[r]``
    (the holder ranks covering its slice, one engine's: ``p2pkv.vllm.sources``).
    ``layerwise``: the request is computed in this very step (vLLM's synchronous load), so
    the load is split by layer groups and each attention layer waits for its own group
    (``p2pkv.vllm.layerwise``); otherwise it waits in WAITING_FOR_REMOTE_KVS."""

    req_id: str
    chunks: tuple[ChunkLoad, ...]
    sources: tuple[tuple[Source, ...], ...]
    layerwise: bool = False
    peer: str = ""
    """The holder engine (the planner's per-peer link estimate learns from this pull)."""


@dataclass(frozen=True, slots=True)
class SavePlan:
    """Copy the blocks of chunk ``key`` into the store after this step's forward pass."""

    key: ChunkKey
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """Serve ``chunks`` of finished request ``req_id`` from its blocks (held by vLLM until
    every rank reports the request in ``finished_sending``) for ``ttl_s``; at most
    ``max_pulls`` pulls (0: no limit). ``ttl_s`` 0: no lease, only the move to the store."""

    req_id: str
    chunks: tuple[SavePlan, ...]
    ttl_s: float
    max_pulls: int = 0


@dataclass
class P2PKVMetadata(KVConnectorMetadata):
    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)
    new_blocks: frozenset[int] = frozenset()
    """Blocks vLLM handed to requests this step (this step may zero and write them): the
    worker's saves must be done reading them first (``p2pkv.vllm.saver``). Set by savers."""
    grants: list[LeaseGrant] = field(default_factory=list)
    """Leases on requests that finished (``SchedulerSide.request_finished``)."""
    end_leases: list[str] = field(default_factory=list)
    """Requests whose leases end now (the holder needs the memory)."""
    idle_step: bool = False
    """vLLM runs no forward pass this step (it only polls the connector, e.g. while requests
    wait for remote KV): a rank with loads in flight may wait for one in ``get_finished``
    (``WorkerSide.take_finished_recving``) instead of letting vLLM step again at once."""
    idle_wait: bool = False
    """The scheduler side waits between idle steps while leases are out (in the EngineCore,
    ``p2pkv.vllm.idlewait``), so a rank does not wait for a lease to end in ``get_finished``."""
    wake_port: int = 0
    """UDP port on 127.0.0.1 of that wait: a rank pings it when a lease can be handed back
    before its end (0: none)."""
    planner_status: dict[str, int] | None = None
    """The planner's numbers for ``p2pkv status`` when they changed (at most once a second):
    the registering worker ranks add them to their directory Report."""


@dataclass
class P2PKVWorkerMeta(KVConnectorWorkerMetadata):
    """Worker ranks -> scheduler side, every step (vLLM aggregates the ranks'): the pulls
    that ended, for the planner's link estimates. Sent even when empty, so the scheduler
    side hears of every executed step (its prefill-speed samples pair steps with outputs)."""

    pulls: list[PullSample] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, P2PKVWorkerMeta):
            return self
        return P2PKVWorkerMeta(self.pulls + other.pulls)
