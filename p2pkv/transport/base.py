"""The Transport interface and the one function that picks an implementation from config.

The worker side of the connector creates its ChunkStore through a transport (so that the slab
lives where the transport can serve it from), serves it, and pulls peers' chunks through it.
Implementations: ``tcp`` (everywhere, the fallback); ``shm`` (TCP, plus copies straight out of
the slab of holders on the same host); ``ucx`` (TCP control, bytes over UCX: GPU memory,
RDMA; see ``transport/ucx.py``). ``auto`` resolves to the best available one and logs why,
once. A pull's destination pieces are host memory (``memoryview``) or CUDA memory (1-D
uint8 torch tensors), see ``transport/staging.py``.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey
from p2pkv.secret import ClusterSecret, derive
from p2pkv.store import ChunkStore

logger = logging.getLogger(__name__)

TRANSPORT_KINDS = ("auto", "tcp", "shm", "ucx")


@dataclass(frozen=True, slots=True)
class PullItem:
    """One chunk to pull: its bytes land, in order, in the ``dest`` pieces: host memory
    (``memoryview``, zero-copy over TCP) or CUDA memory (1-D uint8 torch tensors)."""

    key: ChunkKey
    dest: tuple[Any, ...]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.dest)


class Outcome(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # the holder no longer has it (evicted): not an error of anyone's
    FAILED = "failed"  # peer gone, deadline, framing or checksum error


@dataclass(frozen=True, slots=True)
class PullResult:
    key: ChunkKey
    outcome: Outcome
    reason: str = ""


class Transport(abc.ABC):
    """Serves one store and pulls from peers. ``pull`` may be called from several threads."""

    name: str

    def create_store(self, slot_bytes: int, capacity: int) -> ChunkStore:
        """The store this transport can serve best (closed by ``close``)."""
        return ChunkStore(slot_bytes, capacity)

    @abc.abstractmethod
    def serve(self, store: ChunkStore) -> str:
        """Start serving ``store`` in the background; return the address peers pull from."""

    @abc.abstractmethod
    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float) -> list[PullResult]:
        """Pull ``items`` from the peer at ``address``; never raises for peer errors and
        returns within ``timeout_s`` (plus scheduling noise). Items not OK may hold partial
        bytes in their destination: the caller must treat them as garbage."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and drop connections."""


def has_rdma() -> bool:
    """An RDMA device (InfiniBand / RoCE) is visible here."""
    import os

    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """What a configured kind resolves to on this host, and why (logged by make_transport,
    shown by ``p2pkv doctor``)."""

    same_host: bool
    """Serve from a shared slab and copy from same-host holders' slabs (the ``shm`` path)."""
    reason: str
    ucx: bool = False
    """Bytes bound for GPU memory move over UCX (to holders that offer it)."""
    host_over_ucx: bool = False
    """Bytes bound for host memory too (RDMA, or ``ucx`` configured)."""

    @property
    def name(self) -> str:
        return "ucx" if self.ucx else "shm" if self.same_host else "tcp"


def choose_transport(kind: str, store_bytes: int = 0, cuda_device: int | None = None
                     ) -> TransportChoice:
    """The one decision of which implementation ``kind`` means here; raises ConfigError for
    an unknown kind, or ``ucx`` where ucxx does not work. ``store_bytes``: how big the store
    will be, so that ``auto`` does not put a slab into a /dev/shm too small for it.
    ``cuda_device``: the GPU whose KV cache pulls land in (None: host memory).

    ``auto`` uses UCX where it pays (KV on a GPU, or an RDMA device) and ucxx works: plain
    sockets beat UCX's tcp transport 3-4x between CPU hosts (MEASURED.md), so a CPU-only
    instance without RDMA stays on our TCP, plus shm for same-host peers.
    """
    if kind not in TRANSPORT_KINDS:
        raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}, not {kind!r}")
    if kind == "tcp":
        return TransportChoice(False, "configured: tcp")
    if kind == "shm":
        return TransportChoice(True, "configured: shm for same-host peers, tcp for the others")
    from p2pkv.transport.ucx import ucx_unavailable_reason

    rdma = has_rdma()
    wanted = kind == "ucx" or cuda_device is not None or rdma
    missing = ucx_unavailable_reason() if wanted else ""  # (importing ucxx costs ~0.5 s)
    if kind == "ucx":
        if missing:
            raise ConfigError(f"transport 'ucx': {missing} (pip install 'p2pkv[ucx]')")
        return TransportChoice(False, "configured: ucx for every pull", True, True)
    from p2pkv.store import shm_room

    room = shm_room()
    same_host = room > store_bytes
    shm = ("shm for same-host peers" if same_host else
           f"no shm path (/dev/shm has {room >> 20} MiB free, the store needs "
           f"{store_bytes >> 20} MiB)")
    if wanted and not missing:
        what = "every pull (RDMA device present)" if rdma else "pulls into GPU memory"
        return TransportChoice(same_host, f"auto: ucx for {what}, {shm}, tcp otherwise",
                               True, rdma)
    why = missing or "not worth it without a GPU or RDMA"
    return TransportChoice(same_host, f"auto: {shm}, tcp for the others (ucx: {why})")


def pulls_over_ucx(*, peer_offers_ucx: bool, to_gpu: bool, host_over_ucx: bool,
                   slab_mapped: bool) -> bool:
    """The one rule for whether a pull moves its bytes over UCX (``UcxTransport`` follows it,
    ``p2pkv doctor`` reports it): into GPU memory whenever the holder offers UCX (it beats the
    slab there, see ``transport/ucx.py``); into host memory only where UCX is wanted for host
    pulls and no same-host slab is mapped."""
    return peer_offers_ucx and (to_gpu or (host_over_ucx and not slab_mapped))


def make_transport(kind: str, *, bind_host: str, advertise_host: str | None = None,
                   connections_per_peer: int = 2, secret: ClusterSecret | None = None,
                   store_bytes: int = 0, cuda_device: int | None = None) -> Transport:
    """The one place that maps config to an implementation (the decision itself is
    :func:`choose_transport`).

    ``secret``: the cluster secret; without one the data plane is unauthenticated (fine on
    loopback, said once in the log). ``store_bytes``, ``cuda_device``: see
    :func:`choose_transport`.
    """
    choice = choose_transport(kind, store_bytes, cuda_device)
    from p2pkv.transport.tcp import TcpTransport

    key = derive(secret, "data-plane") if secret is not None else None
    if key is None:
        logger.warning("p2pkv data plane: no cluster secret, peers are not authenticated "
                       "(keep it on loopback or a private network)")
    tcp_args = dict(bind_host=bind_host, advertise_host=advertise_host,
                    connections_per_peer=connections_per_peer, key=key,
                    same_host=choice.same_host)
    if choice.ucx:
        from p2pkv.transport.ucx import UcxTransport

        try:
            t = UcxTransport(host_over_ucx=choice.host_over_ucx, **tcp_args)
        except Exception as e:  # noqa: BLE001 - UCX failing to start must not stop auto
            if kind == "ucx":
                raise ConfigError(f"transport 'ucx' failed to start: {e}") from e
            logger.warning("p2pkv transport auto: UCX failed to start (%s); tcp%s instead", e,
                           " and shm" if choice.same_host else "")
        else:
            logger.info("p2pkv transport %s", choice.reason)
            return t
    if kind == "auto":
        logger.info("p2pkv transport %s", choice.reason)
    return TcpTransport(**tcp_args)
