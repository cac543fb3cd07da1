"""The data plane's interface and its value types: what a pull asks for, what it returns,
and what a configured transport kind resolves to.

The worker side of the connector creates its ChunkStore through a :class:`Transport` (so that
the slab lives where the transport can serve it from), serves it, and pulls peers' chunks
through it. The one implementation is :class:`p2pkv.transport.peer.PeerTransport`, made by
:func:`p2pkv.transport.choose.make_transport`; it picks a path per pull (``stream.py``,
``shm.py``, ``ucx.py``) by :meth:`TransportChoice.path`. Nothing here imports an
implementation.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

from p2pkv.errors import ChecksumMismatch
from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore
from p2pkv.transport.identity import HolderKey
from p2pkv.transport.selection import Selection

if TYPE_CHECKING:
    from p2pkv.transport.leased import LeasedChunks
    import torch

PathName = Literal["tcp", "shm", "ucx"]
"""How one pull moves its bytes: over the TCP stream, out of a same-host slab, over UCX."""


class DeviceChunk(abc.ABC):
    """A whole chunk's destination in GPU memory that places the bytes itself.

    For caches whose blocks are one dense segment each, writing a chunk with one indexed copy
    per layer beats a copy per (block, layer) piece (a 16-block chunk of a 32-layer model is
    512 pieces). The vLLM side implements it (``vllm/layout.DeviceBlocks``); the transport
    calls ``write_from`` with the chunk, contiguous, in slot order, in device memory.
    """

    nbytes: int
    device: torch.device

    @abc.abstractmethod
    def write_from(self, src: torch.Tensor) -> None:
        """Copy ``src`` (a uint8 device tensor of ``nbytes``) into place, on the current
        stream."""


Piece = Union[memoryview, "torch.Tensor", DeviceChunk]
"""One destination piece of a pull: host memory (``memoryview``, zero-copy over TCP), CUDA
memory (a 1-D uint8 tensor), or a :class:`DeviceChunk`."""


def is_device(piece: Piece) -> bool:
    return not isinstance(piece, memoryview)


def host_pieces(pieces: Sequence[Piece]) -> bool:
    """Every piece is host memory."""
    return all(isinstance(p, memoryview) for p in pieces)


@dataclass(frozen=True, slots=True)
class PullItem:
    """One chunk to pull: its bytes land, in order, in the ``dest`` pieces. With ``select``
    only that part of the chunk is pulled (``selection.py``; the items of one pull share one
    selection)."""

    key: ChunkKey
    dest: tuple[Piece, ...]
    select: Selection | None = None

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.dest)


def common_selection(items: Sequence[PullItem]) -> Selection | None:
    """The one selection of a pull's items (ValueError: a caller bug, they differ)."""
    select = items[0].select if items else None
    if any(i.select != select for i in items):
        raise ValueError("the items of one pull must share one selection")
    return select


class Outcome(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # the holder no longer has it (evicted): not an error of anyone's
    FAILED = "failed"  # peer gone, deadline, framing or checksum error


@dataclass(frozen=True, slots=True)
class PullResult:
    key: ChunkKey
    outcome: Outcome
    reason: str = ""


def ok(item: PullItem) -> PullResult:
    return PullResult(item.key, Outcome.OK)


def missing(item: PullItem) -> PullResult:
    return PullResult(item.key, Outcome.MISSING, "holder no longer has it")


def mismatch(item: PullItem) -> PullResult:
    return PullResult(item.key, Outcome.FAILED, str(ChecksumMismatch("checksum mismatch")))


def checked(item: PullItem, got: int, want: int) -> PullResult:
    """OK when the digest of what arrived (``got``) is the holder's (``want``)."""
    return mismatch(item) if got != want else ok(item)


def failed(items: Sequence[PullItem], reason: str) -> list[PullResult]:
    return [PullResult(i.key, Outcome.FAILED, reason) for i in items]


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """What a configured kind resolves to on this host, and why (made by
    ``choose.choose_transport``, logged by ``make_transport``, shown by ``p2pkv doctor``).
    The transport is named after it and follows :meth:`path` on every pull."""

    same_host: bool
    """Serve from a shared slab and copy from same-host holders' slabs (the ``shm`` path)."""
    reason: str
    ucx: bool = False
    """Bytes bound for GPU memory move over UCX (to holders that offer it)."""
    host_over_ucx: bool = False
    """Bytes bound for host memory too (RDMA, or ``ucx`` configured)."""

    @property
    def name(self) -> PathName:
        return "ucx" if self.ucx else "shm" if self.same_host else "tcp"

    def path(self, *, peer_offers_ucx: bool, slab_mapped: bool, to_gpu: bool) -> PathName:
        """The one rule for how a pull moves its bytes (the transport follows it, ``p2pkv
        doctor`` reports it): over UCX into GPU memory whenever the holder offers UCX (it
        beats the slab there, see ``transport/ucx.py``), into host memory only where UCX is
        wanted for host pulls and no same-host slab is mapped; else out of the slab if one is
        mapped; else over the TCP stream."""
        # NOTE: into GPU memory UCX beats even a same-host holder's slab: measured on an H200
        # host (scripts/gpu_check.py), 18-20 GB/s over UCX vs 5 GB/s from the page-locked
        # slab mapping, where the CPU's digest check of the bytes (~8 GB/s) is the limit.
        if self.ucx and peer_offers_ucx and (to_gpu or (self.host_over_ucx and not slab_mapped)):
            return "ucx"
        return "shm" if slab_mapped else "tcp"


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """The data-plane server as its owner sees it (``Server.health``)."""

    alive: bool
    """The accept loop runs: new peers can connect."""
    saturated: bool
    """A connection was refused or dropped at a cap within ``saturated_window_s``."""
    handshaking: int
    connections: int
    refused: int
    """Connections turned away at a cap, in all (refused + dropped handshakes)."""
    expired: int
    failed_handshakes: int
    thread_failures: int
    """Authenticated connections closed because their thread could not start."""
    pins_refused: int
    """Keys answered MISSING because their peer was at its pin cap."""
    loop_errors: int
    bad_macs: int = 0
    """Connections dropped because a request failed its MAC (tampered, replayed, or from
    another session)."""
    wrong_namespace: int = 0
    """Requests refused because they named another namespace."""
    wrong_epoch: int = 0
    """Requests refused because they named another instance epoch (a reused address)."""

    def counters(self) -> dict[str, int]:
        """As connector counters (``server_*``), reported to the directory; only values that
        change when something goes wrong (so they do not cause a report each step)."""
        return {"server_alive": int(self.alive), "server_saturated": int(self.saturated),
                "server_refused": self.refused, "server_thread_failures": self.thread_failures,
                "server_pins_refused": self.pins_refused, "server_loop_errors": self.loop_errors,
                "server_bad_macs": self.bad_macs,
                "server_wrong_namespace": self.wrong_namespace,
                "server_wrong_epoch": self.wrong_epoch}


class Transport(abc.ABC):
    """Serves one store and pulls from peers. ``pull`` may be called from several threads."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """What the transport registers as its capability (``tcp``, ``shm``, ``ucx``)."""

    def create_store(self, slot_bytes: int, capacity: int) -> ChunkStore:
        """The store this transport can serve best (closed by ``close``)."""
        return ChunkStore(slot_bytes, capacity)

    @abc.abstractmethod
    def serve(self, store: ChunkStore, epoch: int = 0, leased: LeasedChunks | None = None
              ) -> str:
        """Start serving ``store`` in the background (and ``leased`` chunks, read in place:
        ``transport/leased.py``); return the address peers pull from. ``epoch``: this
        instance's, as registered with the directory (0: none): requests naming another are
        refused."""

    @abc.abstractmethod
    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float,
             epoch: int = 0, holder_key: HolderKey | None = None) -> list[PullResult]:
        """Pull ``items`` from the peer at ``address``; never raises for peer errors and
        returns within ``timeout_s`` (plus scheduling noise). Items not OK may hold partial
        bytes in their destination: the caller must treat them as garbage. ``epoch``: the
        holder's instance epoch from the directory's lookup (0: not checked); a holder that
        is another epoch (a reused address) serves none of them. ``holder_key``: the
        holder instance's public key from the lookup (None: not checked); a holder that
        cannot prove it (another member at that address) serves none of them."""

    def pull_staged(self, address: str, stages: Sequence[Sequence[PullItem]], timeout_s: float,
                    on_stage: Callable[[int], None], epoch: int = 0,
                    holder_key: HolderKey | None = None) -> list[list[PullResult]]:
        """Pull the same chunks in ``stages`` (each with its own selection), in order, calling
        ``on_stage(s)`` once stage ``s`` has landed (``staged.py``); one result list per
        stage, final only on return. Never raises for peer errors; returns within
        ``timeout_s``. This default pulls stage by stage; ``PeerTransport`` checks a
        same-host holder's digests once instead of once per stage."""
        deadline = time.monotonic() + timeout_s
        out = []
        for s, stage in enumerate(stages):
            out.append(self.pull(address, stage, max(deadline - time.monotonic(), 0.001),
                                 epoch, holder_key))
            on_stage(s)
        return out

    def health(self) -> ServerHealth | None:
        """The server's health once ``serve`` was called (None before, or for transports
        without a server of their own)."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and drop connections."""

